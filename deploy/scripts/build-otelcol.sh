#!/usr/bin/env bash
# Builds the Collector from deploy/otelcol/builder-config.yaml with the OpenTelemetry Collector
# Builder, once: the binary is cached under $OTELCOL_CACHE keyed by the manifest's hash, so a
# second run (and CI on the same machine) reuses it. Prints the binary's path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
manifest=$here/deploy/otelcol/builder-config.yaml
builder_version=v0.159.0
cache=${OTELCOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-otlp-receiver/otelcol}
key=$(cat "$manifest" | sha256sum | cut -c1-16)
out=$cache/$key
bin=$out/otelcol-ebpf/otelcol-ebpf
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

# ocb $builder_version needs Go >= $go_min. Debian 12's golang-go (1.19) is older: then a Go
# toolchain comes from the Go module proxy (the same place `GOTOOLCHAIN=auto` fetches it from),
# cached beside the Collector.
go_min=1.25.0
go_fallback=1.25.5
go_ok() {
  command -v go >/dev/null || return 1
  local v; v=$(go env GOVERSION 2>/dev/null | sed 's/^go//') || return 1
  [ "$(printf '%s\n%s\n' "$go_min" "$v" | sort -V | head -n1)" = "$go_min" ]
}
if ! go_ok; then
  case $(uname -m) in x86_64) goarch=amd64 ;; aarch64) goarch=arm64 ;; *) goarch=$(uname -m) ;; esac
  toolchain=$cache/go$go_fallback
  if [ ! -x "$toolchain/bin/go" ]; then
    proxy=${GOPROXY:-https://proxy.golang.org}; proxy=${proxy%%,*}
    url=$proxy/golang.org/toolchain/@v/v0.0.1-go$go_fallback.linux-$goarch.zip
    echo "otelcol: no Go >= $go_min here; fetching Go $go_fallback from $url" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    curl -fsSL --retry 3 "$url" -o "$tmp/go.zip"
    unzip -q "$tmp/go.zip" -d "$tmp"
    mkdir -p "$cache"
    rm -rf "$toolchain"
    mv "$tmp"/golang.org/toolchain@*/ "$toolchain"
  fi
  export PATH=$toolchain/bin:$PATH GOTOOLCHAIN=local
fi
gobin=$(go env GOPATH)/bin
if ! "$gobin/builder" version 2>/dev/null | grep -q "${builder_version#v}"; then
  echo "otelcol: installing the Collector Builder $builder_version" >&2
  go install "go.opentelemetry.io/collector/cmd/builder@$builder_version" >&2
fi
mkdir -p "$out"
cp "$manifest" "$out/builder-config.yaml"
echo "otelcol: building the Collector into $out (a few minutes, once)" >&2
(cd "$out" && "$gobin/builder" --config builder-config.yaml >build.log 2>&1) || {
  tail -n 30 "$out/build.log" >&2; echo "error: Collector build failed, full log: $out/build.log" >&2; exit 1; }
echo "$bin"
