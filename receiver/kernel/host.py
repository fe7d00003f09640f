"""What the host grants: privileges, tracefs, kernel headers for BCC, and real probes of bpf()
and perf_event_open. Each missing piece has one fix text here, which ``check`` and source
start-up both show."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

from .capabilities import CAPABILITIES, missing

__all__ = ["FIX_PRIVILEGES", "FIX_BCC", "FIX_HEADERS", "FIX_TRACEFS", "FIX_BPF_SYSCALL", "FIX_PERF_EVENTS",
           "has_bpf_capabilities", "tracefs_root", "kernel_headers_dir", "probe_bpf_syscall",
           "probe_perf_event"]

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}
_SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}

FIX_PRIVILEGES = "grant " + ", ".join(c.name for c in CAPABILITIES) + " (README: Capabilities)"
FIX_BCC = "apt-get install python3-bpfcc, and make the venv see it (make setup links it)"
FIX_HEADERS = ("apt-get install linux-headers-amd64 (or linux-headers-$(uname -r)), then "
               "deploy/scripts/prepare-host.sh links them")
FIX_TRACEFS = "mount -t tracefs nodev /sys/kernel/tracing (in a container: mount it read-only)"
FIX_BPF_SYSCALL = ("a kernel with CONFIG_BPF_SYSCALL=y; check kernel.unprivileged_bpf_disabled "
                   "and the seccomp profile")
FIX_PERF_EVENTS = ("a kernel with CONFIG_PERF_EVENTS; kernel.perf_event_paranoid <= 2 with "
                   "CAP_PERFMON, or root")


def has_bpf_capabilities() -> bool:
    """CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) in the effective set."""
    return not missing(required_only=True)


def tracefs_root() -> Path | None:
    for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (p / "events").is_dir():
            return p
    return None


def kernel_headers_dir() -> Path:
    """Where BCC's compiler looks for kernel headers."""
    return Path(f"/lib/modules/{os.uname().release}/build")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def probe_bpf_syscall() -> tuple[bool, str]:
    """Creates (and closes) a one-entry BPF array map: what every source needs first."""
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        return False, f"unknown architecture {platform.machine()}"
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries (u32 each).
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY
    fd = _libc().syscall(nr, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd < 0:
        return False, os.strerror(ctypes.get_errno())
    os.close(fd)
    return True, "map created"


def probe_perf_event() -> tuple[bool, str]:
    """Opens (and closes) a disabled software cpu-clock event: what the profiler samples with."""
    nr = _SYSCALL_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        return False, f"unknown architecture {platform.machine()}"
    attr = (ctypes.c_uint8 * 128)()
    ctypes.c_uint32.from_buffer(attr, 0).value = 1     # PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 128   # size
    ctypes.c_uint64.from_buffer(attr, 8).value = 0     # PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint64.from_buffer(attr, 40).value = 1    # flags: disabled
    fd = _libc().syscall(nr, ctypes.byref(attr), -1, 0, -1, 0)
    if fd < 0:
        return False, os.strerror(ctypes.get_errno())
    os.close(fd)
    return True, "software cpu-clock event opened"
