#!/bin/bash
# Runs as the guest's PID 1 after the initramfs switched to the shared root (see vm.py): mounts
# what the agent needs, runs the smoke suite into /mnt/out, and powers the guest off. Whatever
# happens, the guest ends (a hung one is killed by the host at its timeout).
export PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
# The loader compiles each BPF program under TCG, three guests sharing two cores: its 600 s
# default killed the 6.12 guest's profiler compile (exit -9) in a loaded run.
export PYTHONDONTWRITEBYTECODE=1 CI=true EBPF_TEST_AGENT_READY_TIMEOUT=400 EBPF_TEST_TIME_SCALE=5
export EBPF_RECEIVER_LOADER_TIMEOUT=1800
for f in /mnt/otelcol/*; do [ -f "$f" ] && [ -x "$f" ] && export OTELCOL_BIN=$f; done   # the Collector, shared by the host
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
ip link set lo up
hostname kernel-matrix
echo "guest: $(uname -r) up after $(cut -d' ' -f1 /proc/uptime)s"
cd /mnt/src
timeout 2100 python3 tests/kernels/guest_suite.py /mnt/out
echo "guest: suite exit $? after $(cut -d' ' -f1 /proc/uptime)s"
sync
echo o > /proc/sysrq-trigger
sleep 10
