"""``check``: what this host has and lacks for the configured sources, one row per requirement,
each with the fix. Probes are real (a bpf() map create, a perf_event_open), not guesses."""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .config import EbpfConfig

__all__ = ["CheckRow", "run_checks", "has_bpf_capabilities", "tracefs_root", "format_rows"]

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}
_SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}


@dataclass(frozen=True)
class CheckRow:
    requirement: str
    ok: bool
    detail: str = ""
    fix: str = ""
    needed_by: tuple[str, ...] = ()


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_bpf_capabilities() -> bool:
    caps = _effective_caps()
    return bool(caps & (1 << CAP_SYS_ADMIN)) or (
        bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON)))


def tracefs_root() -> Path | None:
    for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (p / "events").is_dir():
            return p
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _probe_bpf_syscall() -> tuple[bool, str]:
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        return False, f"unknown architecture {platform.machine()}"
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries (u32 each).
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY
    libc = _libc()
    fd = libc.syscall(nr, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd < 0:
        return False, os.strerror(ctypes.get_errno())
    os.close(fd)
    return True, "map created"


def _probe_perf_event() -> tuple[bool, str]:
    nr = _SYSCALL_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        return False, f"unknown architecture {platform.machine()}"
    attr = (ctypes.c_uint8 * 128)()
    ctypes.c_uint32.from_buffer(attr, 0).value = 1     # PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 128   # size
    ctypes.c_uint64.from_buffer(attr, 8).value = 0     # PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint64.from_buffer(attr, 40).value = 1    # flags: disabled
    libc = _libc()
    fd = libc.syscall(nr, ctypes.byref(attr), -1, 0, -1, 0)
    if fd < 0:
        return False, os.strerror(ctypes.get_errno())
    os.close(fd)
    return True, "software cpu-clock event opened"


def run_checks(config: EbpfConfig) -> list[CheckRow]:
    from .sources import source_classes

    enabled = config.sources.enabled()
    rows: list[CheckRow] = []
    every = tuple(enabled)

    root = os.geteuid() == 0
    caps = has_bpf_capabilities()
    rows.append(CheckRow("root or CAP_BPF+CAP_PERFMON", root or caps,
                         "running as root" if root else ("capabilities present" if caps else "neither"),
                         "run as root, or grant CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE", every))
    ok, detail = _probe_bpf_syscall()
    rows.append(CheckRow("bpf() syscall", ok, detail,
                         "kernel with CONFIG_BPF_SYSCALL=y; check kernel.unprivileged_bpf_disabled and seccomp",
                         every))
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    rows.append(CheckRow("kernel BTF (/sys/kernel/btf/vmlinux)", btf, "present" if btf else "missing",
                         "kernel with CONFIG_DEBUG_INFO_BTF=y (optional: used for fentry/fexit)", ()))
    tfs = tracefs_root()
    rows.append(CheckRow("tracefs mounted", tfs is not None, str(tfs) if tfs else "not mounted",
                         "mount -t tracefs nodev /sys/kernel/tracing (in a container: mount it read-only)",
                         every))
    try:
        import bcc  # noqa: F401

        rows.append(CheckRow("BCC Python module", True, "importable", "", every))
    except ImportError:
        rows.append(CheckRow("BCC Python module", False, "not importable",
                             "apt-get install python3-bpfcc; the venv needs it linked (make setup does it)",
                             every))
    build = Path(f"/lib/modules/{os.uname().release}/build")
    hdr = (build / "include").exists()
    rows.append(CheckRow("kernel headers for BCC", hdr, str(build) if hdr else f"{build} missing",
                         "apt-get install linux-headers-amd64; deploy/scripts/prepare-host.sh links them",
                         every))
    from .kernel_features import check_rows as kernel_feature_rows

    rows.extend(kernel_feature_rows(enabled))   # type: ignore[arg-type]
    classes = source_classes()
    needed: dict[tuple[str, str], list[str]] = {}
    optional: dict[tuple[str, str], bool] = {}
    for name in enabled:
        cls = classes.get(name)
        if cls is None:
            rows.append(CheckRow(f"source {name}", False, "not available in this build", "", (name,)))
            continue
        for req in cls.requirements(config):
            needed.setdefault((req.kind, req.name), []).append(name)
            optional[(req.kind, req.name)] = optional.get((req.kind, req.name), True) and req.optional
    perf_done = False
    for (kind, name), users in needed.items():
        opt = optional[(kind, name)]
        if kind == "tracepoint":
            cat, _, ev = name.partition(":")
            present = tfs is not None and (tfs / "events" / cat / ev).is_dir()
            rows.append(CheckRow(f"tracepoint {name}", present, "present" if present else "missing",
                                 "a kernel built with this tracepoint" + (" (optional)" if opt else ""),
                                 () if opt else tuple(users)))
        elif kind == "perf_event" and not perf_done:
            perf_done = True
            ok, detail = _probe_perf_event()
            rows.append(CheckRow("perf events (software cpu-clock)", ok, detail,
                                 "kernel.perf_event_paranoid <= 2 with CAP_PERFMON, or root", tuple(users)))
    return rows


def format_rows(rows: list[CheckRow]) -> str:
    width = max(len(r.requirement) for r in rows)
    out = []
    for r in rows:
        status = "ok" if r.ok else ("missing" if r.needed_by else "missing (optional)")
        line = f"{r.requirement:<{width}}  {status:<18} {r.detail}"
        if not r.ok and r.fix:
            line += f"\n{'':<{width}}  fix: {r.fix}"
        out.append(line)
    return "\n".join(out)
