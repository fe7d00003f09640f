"""The agent's capability set, stated once: docker-compose.yml, the Kubernetes DaemonSet, the
systemd unit and the README list exactly these (tests/test_deploy.py checks that they agree),
and ``check`` and source start-up name the missing ones.

Root (uid 0) is not enough on its own: a container or a systemd unit runs as uid 0 with only the
capabilities it was granted, so permission problems are told by the capabilities and by a real
bpf() probe, never by the uid.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CAPABILITIES",
    "REQUIRED",
    "Capability",
    "bpf_denied",
    "bpf_map_create_errno",
    "effective_caps",
    "explain_load_failure",
    "has",
    "missing",
]


@dataclass(frozen=True)
class Capability:
    name: str          # "CAP_BPF"
    number: int        # bit in /proc/PID/status CapEff
    required: bool     # False: missing it only degrades (names), the sources still run
    why: str


CAPABILITIES = (
    Capability("CAP_BPF", 39, True, "load BPF programs and create BPF maps (bpf(2))"),
    Capability("CAP_PERFMON", 38, True,
               "load tracing programs, attach them to tracepoints, open perf events (profiler)"),
    Capability("CAP_SYS_PTRACE", 19, False,
               "read other processes' /proc/PID/maps and mapped files to name user-stack frames"),
    Capability("CAP_SYSLOG", 34, False,
               "read kernel addresses in /proc/kallsyms to name kernel-stack frames "
               "(without it, or kernel.perf_event_paranoid <= 1, they read as zero)"),
)
REQUIRED = tuple(c for c in CAPABILITIES if c.required)
CAP_SYS_ADMIN = 21    # covers CAP_BPF and CAP_PERFMON (and is what kernels < 5.8 need)

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}


def effective_caps(status: str = "/proc/self/status") -> int:
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has(name: str, caps: int | None = None) -> bool:
    """Whether ``caps`` (default: this process's effective set) holds capability ``name``."""
    (cap,) = [c for c in CAPABILITIES if c.name == name]
    return bool((effective_caps() if caps is None else caps) & (1 << cap.number))


def missing(caps: int | None = None, required_only: bool = False) -> list[Capability]:
    """The capabilities of the set that ``caps`` (default: this process's effective set)
    lacks; CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON."""
    caps = effective_caps() if caps is None else caps
    admin = bool(caps & (1 << CAP_SYS_ADMIN))
    out = []
    for c in CAPABILITIES:
        if required_only and not c.required:
            continue
        if caps & (1 << c.number) or (admin and c.name in ("CAP_BPF", "CAP_PERFMON")):
            continue
        out.append(c)
    return out


def bpf_map_create_errno() -> int:
    """0 when bpf(BPF_MAP_CREATE) of a one-entry array works, else its errno."""
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        return 0
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)   # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, 0, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def bpf_denied() -> str | None:
    """Why this process may not use bpf(), naming the fix, or None when it may."""
    err = bpf_map_create_errno()
    if err not in (errno.EPERM, errno.EACCES):
        return None
    lacking = [c.name for c in missing(required_only=True)]
    if lacking:
        return (f"permission denied: bpf() returned {errno.errorcode[err]} and the process lacks "
                f"{', '.join(lacking)}; grant {' and '.join(lacking)} (kernels before 5.8: "
                "CAP_SYS_ADMIN)")
    return (f"permission denied: bpf() returned {errno.errorcode[err]} although CAP_BPF is held: a "
            "seccomp profile or LSM blocks it (Docker before 23.0 allows bpf() only with "
            "CAP_SYS_ADMIN: use docker-compose.docker20.env)")


def explain_load_failure(exc: BaseException) -> str | None:
    """For a BCC load/attach failure: a permission problem told apart from a compile error.
    Returns the reason with the missing capability named, or None when it is not about
    permissions (then the original error stands)."""
    denied = bpf_denied()
    if denied:
        return denied
    text = str(exc)
    lacking = [c.name for c in missing(required_only=True)]
    if lacking and ("Operation not permitted" in text or "Permission denied" in text):
        return f"permission denied loading or attaching BPF programs: grant {' and '.join(lacking)}"
    return None
