#!/usr/bin/env bash
# Sourced, not run: `ensure_go MIN CACHE_DIR` puts a Go >= MIN on PATH. Debian 12's golang-go
# (1.19) is older than what the Collector Builder and Compose need: then a Go toolchain comes
# from the Go module proxy (the same place `GOTOOLCHAIN=auto` fetches it from), cached in
# CACHE_DIR. Used by build-otelcol.sh and build-compose.sh.
go_fallback=1.25.5

go_at_least() {
  command -v go >/dev/null || return 1
  local v; v=$(go env GOVERSION 2>/dev/null | sed 's/^go//') || return 1
  [ "$(printf '%s\n%s\n' "$1" "$v" | sort -V | head -n1)" = "$1" ]
}

ensure_go() {
  local go_min=$1 cache=$2
  go_at_least "$go_min" && return 0
  local goarch toolchain proxy url tmp
  case $(uname -m) in x86_64) goarch=amd64 ;; aarch64) goarch=arm64 ;; *) goarch=$(uname -m) ;; esac
  toolchain=$cache/go$go_fallback
  if [ ! -x "$toolchain/bin/go" ]; then
    proxy=${GOPROXY:-https://proxy.golang.org}; proxy=${proxy%%,*}
    url=$proxy/golang.org/toolchain/@v/v0.0.1-go$go_fallback.linux-$goarch.zip
    echo "go: no Go >= $go_min here; fetching Go $go_fallback from $url" >&2
    tmp=$(mktemp -d)
    curl -fsSL --retry 3 "$url" -o "$tmp/go.zip" && unzip -q "$tmp/go.zip" -d "$tmp" || {
      rm -rf "$tmp"; echo "error: could not fetch Go $go_fallback" >&2; return 1; }
    mkdir -p "$cache"
    rm -rf "$toolchain"
    mv "$tmp"/golang.org/toolchain@*/ "$toolchain"
    rm -rf "$tmp"
  fi
  export PATH=$toolchain/bin:$PATH GOTOOLCHAIN=local
}
