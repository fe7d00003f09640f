#!/usr/bin/env bash
# Builds the Collector from deploy/otelcol/builder-config.yaml with the OpenTelemetry Collector
# Builder, once: the binary is cached under $OTELCOL_CACHE keyed by the manifest's hash, so a
# second run (and CI on the same machine) reuses it. Prints the binary's path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
manifest=${OTELCOL_MANIFEST:-$here/deploy/otelcol/builder-config.yaml}   # or another ocb manifest (the k8s gateway)
builder_version=v0.159.0
cache=${OTELCOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-otlp-receiver/otelcol}
key=$(cat "$manifest" | sha256sum | cut -c1-16)
out=$cache/$key
bin=$out/otelcol-ebpf/otelcol-ebpf
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

# ocb $builder_version needs Go >= 1.25 (a toolchain from the Go module proxy when the local one
# is older, cached beside the Collector).
. "$here/deploy/scripts/go-toolchain.sh"
ensure_go 1.25.0 "$cache"
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
