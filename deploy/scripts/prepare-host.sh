#!/usr/bin/env bash
# Makes a development host ready for the tests and `make run`: tracefs mounted. Kernel headers
# need nothing here: the agent points BCC at the running kernel's (/lib/modules/$(uname -r)/build)
# or, without them, at Debian's generic linux-headers-* under /usr/src that
# install-system-deps.sh installs (receiver/kernel/bcc.py find_kernel_headers), and loads from
# its compile cache without any. Nothing is linked under /lib/modules.
set -euo pipefail

if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "warning: could not mount tracefs at /sys/kernel/tracing" >&2
fi
if [ ! -e /sys/kernel/debug/tracing ] && [ -d /sys/kernel/debug ]; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi
if [ -e "/lib/modules/$(uname -r)/build/include" ]; then
  echo "kernel headers: /lib/modules/$(uname -r)/build"
elif ls -d /usr/src/linux-headers-*/include/generated >/dev/null 2>&1; then
  echo "kernel headers: the generic ones under /usr/src ($(ls -d /usr/src/linux-headers-* | tr '\n' ' '))"
else
  echo "warning: no kernel headers: install linux-headers-amd64 (make setup does)" >&2
fi
