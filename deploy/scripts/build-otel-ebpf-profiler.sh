#!/usr/bin/env bash
# Builds the OpenTelemetry eBPF profiler (the reference the profiler benchmark measures beside
# ours, issue 14) from the Go module proxy, once: cached beside the Collector. Prints the binary's
# path on stdout. The module publishes no version list, so it is required at an exact version
# from a throw-away module (`go install mod@version` asks for the list and fails).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
version=v0.0.202633
cache=${OTELCOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-otlp-receiver/otelcol}
out=$cache/otel-ebpf-profiler-$version
bin=$out/ebpf-profiler
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
. "$here/deploy/scripts/go-toolchain.sh"
ensure_go 1.24.0 "$cache"
mkdir -p "$out/mod"
printf 'module benchref\n\ngo 1.24\n' > "$out/mod/go.mod"
echo "otel-ebpf-profiler: building $version into $out (a minute, once)" >&2
(cd "$out/mod" && GOFLAGS=-mod=mod go get "go.opentelemetry.io/ebpf-profiler@$version" >"$out/build.log" 2>&1 &&
  go build -o "$bin.tmp" go.opentelemetry.io/ebpf-profiler >>"$out/build.log" 2>&1) || {
  tail -n 20 "$out/build.log" >&2; echo "error: OTel eBPF profiler build failed, log: $out/build.log" >&2; exit 1; }
mv "$bin.tmp" "$bin"
echo "$bin"
