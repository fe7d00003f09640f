#!/usr/bin/env bash
# Makes a host ready for BCC: tracefs mounted, and kernel headers reachable at
# /lib/modules/$(uname -r)/build. Where the running kernel has no headers package (custom
# kernels, cloud VMs), link Debian's generic linux-headers-amd64 tree: our BPF programs only use
# tracepoint fields and helpers, so header/kernel mismatches cannot change what they read.
set -euo pipefail
kver=$(uname -r)

if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "warning: could not mount tracefs at /sys/kernel/tracing" >&2
fi
if [ ! -e /sys/kernel/debug/tracing ] && [ -d /sys/kernel/debug ]; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi

build=/lib/modules/$kver/build
if [ -e "$build/include" ]; then
  echo "kernel headers: $build"
  exit 0
fi
amd=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$amd" ] || [ -z "$common" ]; then
  echo "error: no kernel headers for $kver and no Debian linux-headers-amd64 to fall back on; install linux-headers-amd64" >&2
  exit 1
fi
mkdir -p "/lib/modules/$kver"
ln -sfn "$amd" "$build"
ln -sfn "$common" "/lib/modules/$kver/source"
echo "kernel headers: linked $build -> $amd (source -> $common)"
