#!/usr/bin/env bash
# Docker Compose v2 for the deployment test, built once from the Go module proxy at a pinned
# version and cached under ~/.cache/ebpf-otlp-receiver/compose/VERSION (Debian 12 ships only
# Compose v1). Prints the binary's path; it works both called directly and as the docker CLI
# plugin (~/.docker/cli-plugins/docker-compose).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
version=v2.40.3
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-otlp-receiver
out=$cache/compose/$version
bin=$out/docker-compose
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

. "$here/deploy/scripts/go-toolchain.sh"
ensure_go 1.24.9 "$cache/otelcol"
# `go install module@version` refuses modules whose go.mod has exclude directives (Compose's
# has): download the module, then build it as the main module.
dir=$(go mod download -json "github.com/docker/compose/v2@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$dir" ] || { echo "error: could not download Compose $version" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
cp -r "$dir" "$tmp/src"
chmod -R u+w "$tmp/src"
echo "compose: building Docker Compose $version into $out (a few minutes, once)" >&2
mkdir -p "$out"
(cd "$tmp/src" && CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$version" \
  -o "$out/docker-compose.tmp" ./cmd) >&2
mv "$out/docker-compose.tmp" "$bin"
echo "$bin"
