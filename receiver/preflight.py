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


def has_bpf_capabilities() -> bool:
    """CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) in the effective set."""
    from .capabilities import missing

    return not missing(required_only=True)


def tracefs_root() -> Path | None:
    for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (p / "events").is_dir():
            return p
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _probe_bpf_syscall() -> tuple[bool, str]:
    from .capabilities import bpf_map_create_errno

    if platform.machine() not in _SYSCALL_BPF:
        return False, f"unknown architecture {platform.machine()}"
    err = bpf_map_create_errno()
    return (False, os.strerror(err)) if err else (True, "map created")


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

    # By capability, not uid: a container or systemd unit is uid 0 with only what it was granted.
    from .capabilities import CAPABILITIES, bpf_denied, has, missing

    lacking = {c.name for c in missing()}
    for cap in CAPABILITIES:
        ok = cap.name not in lacking
        detail = ("present" if has(cap.name) else "covered by CAP_SYS_ADMIN") if ok else "not in the effective set"
        rows.append(CheckRow(cap.name, ok, detail, f"grant {cap.name}: {cap.why}",
                             every if cap.required else ()))
    ok, detail = _probe_bpf_syscall()
    denied = None if ok else bpf_denied()
    rows.append(CheckRow("bpf() syscall", ok, denied or detail,
                         "grant the capabilities above" if denied else
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
