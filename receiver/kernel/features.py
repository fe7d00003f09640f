"""BPF features that came with particular kernel versions, probed on the running kernel, and what
each source does without them (a fallback that keeps its data exact, or being disabled with the
reason and the fix).

Probes look for the helper's implementation in ``/proc/kallsyms`` (names are listed even when
addresses are hidden), not at the version number: distribution kernels backport features, so a
version says little. Tested on Debian's 5.10, 6.1 and 6.12 by ``tests/kernels``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["FEATURES", "Feature", "KernelFeatures", "check_rows", "degradations", "probe",
           "require", "syscalls_cflags"]


@dataclass(frozen=True)
class Feature:
    name: str
    since: str          # the upstream kernel version that added it
    symbol: str         # a function in /proc/kallsyms that exists exactly when it does,
    used_by: str        # source
    without: str        # what that source does on a kernel without it
    fix: str
    tracepoint: str = ""    # or a tracepoint (category:name) that does
    disables: bool = False  # the source cannot run without it


FEATURES = (
    Feature("ringbuf", "5.8", "bpf_ringbuf_reserve", "all",
            "cannot run (every source sends events through a BPF ring buffer)",
            "a kernel >= 5.8"),
    Feature("task_storage", "5.11", "bpf_task_storage_get", "syscalls",
            "calls in flight while their thread sleeps wait in a bounded hash by thread id "
            "(freed at thread exit; exact while fewer than 32768 threads block at once)",
            "a kernel >= 5.11 keeps them in task local storage instead"),
    Feature("task_btf", "5.11", "bpf_get_current_task_btf", "syscalls",
            "not needed by the thread-id fallback (used with task_storage)",
            "a kernel >= 5.11"),
    Feature("sock_length_tracepoints", "6.3", "", "network",
            "cannot run: connection byte counts come from the sock:sock_send_length and "
            "sock:sock_recv_length tracepoints (the agent uses no kprobes)",
            "a kernel >= 6.3", tracepoint="sock:sock_send_length", disables=True),
    Feature("task_pt_regs", "5.15", "bpf_task_pt_regs", "profiler",
            "user stacks are walked with frame pointers only (code built without them shows "
            "one frame): the .eh_frame walker needs the user registers of samples taken in the kernel",
            "a kernel >= 5.15"),
    Feature("batch_ops", "5.6", "generic_map_lookup_batch", "network",
            "reads connection maps one key at a time (same data, more syscalls)",
            "a kernel >= 5.6"),
)


@dataclass(frozen=True)
class KernelFeatures:
    present: dict[str, bool]
    btf: bool

    def has(self, name: str) -> bool:
        return self.present.get(name, False)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _kallsyms_has(text: bytes, symbol: str) -> bool:
    """A function ``symbol`` of the kernel itself (not a module's: those lines end in ``[module]``).
    Plain substring searches: a regular expression over the 5 MB took as long as reading it."""
    name = symbol.encode()
    return any(f" {kind} ".encode() + name + b"\n" in text for kind in "tTwW")


def _tracepoint_exists(name: str) -> bool:
    from .host import tracefs_root

    root = tracefs_root()
    category, _, event = name.partition(":")
    return root is None or (root / "events" / category / event).is_dir()   # no tracefs: check says so


@functools.lru_cache(maxsize=1)
def probe() -> KernelFeatures:
    """The running kernel's features; an unreadable kallsyms counts every feature present (the
    BPF load then says what is missing)."""
    try:
        text = Path("/proc/kallsyms").read_bytes()
    except OSError:
        text = b""
    present = {f.name: (_tracepoint_exists(f.tracepoint) if f.tracepoint else
                        _kallsyms_has(text, f.symbol) if text else True) for f in FEATURES}
    # Tests run the fallbacks on kernels that have the feature: EBPF_RECEIVER_WITHOUT=task_storage
    for name in filter(None, os.environ.get("EBPF_RECEIVER_WITHOUT", "").split(",")):
        present[name.strip()] = False
    return KernelFeatures(present, Path("/sys/kernel/btf/vmlinux").exists())


def degradations(source: str, features: KernelFeatures | None = None) -> list[Feature]:
    """The missing features that change how ``source`` works here."""
    features = features or probe()
    return [f for f in FEATURES if f.used_by == source and not features.has(f.name)
            and f.name != "task_btf"]


def syscalls_cflags(features: KernelFeatures | None = None) -> list[str]:
    """bpf/syscalls.bpf.c's kernel-compat switches."""
    features = features or probe()
    ok = features.has("task_storage") and features.has("task_btf")
    return [f"-DHAVE_TASK_STORAGE={1 if ok else 0}"]


def check_rows(enabled: list[str]) -> list[tuple[str, bool, str, str, tuple[str, ...]]]:
    """``check`` rows (requirement, ok, detail, fix, needed by): each feature an enabled source
    uses, and what the source does without it (a missing one that only degrades its source is
    not needed by it)."""
    features = probe()
    rows = []
    for f in FEATURES:
        users = tuple(enabled) if f.used_by == "all" else tuple(s for s in enabled if s == f.used_by)
        if not users or f.name == "task_btf":
            continue
        ok = features.has(f.name)
        detail = "present" if ok else f"{', '.join(users)}: {f.without}"
        needed_by = users if f.used_by == "all" or f.disables else ()
        rows.append((f"BPF {f.name} (kernel >= {f.since})", ok, detail, f.fix, needed_by))
    return rows


def require(source: str) -> None:
    """Raises ``SourceUnavailableError`` (reason and fix) when the kernel lacks a feature
    ``source`` cannot run without."""
    from ..errors import SourceUnavailableError

    for f in degradations(source):
        if f.disables:
            raise SourceUnavailableError(source, f"kernel without {f.name} (added in {f.since}): "
                                         f"{f.without}", f.fix)
