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
import re
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["KernelFeatures", "Feature", "FEATURES", "probe", "degradations", "syscalls_cflags"]


@dataclass(frozen=True)
class Feature:
    name: str
    since: str          # the upstream kernel version that added it
    symbol: str         # a function in /proc/kallsyms that exists exactly when it does
    used_by: str        # source
    without: str        # what that source does on a kernel without it
    fix: str


FEATURES = (
    Feature("ringbuf", "5.8", "bpf_ringbuf_reserve", "all",
            "cannot run (every source sends events through a BPF ring buffer)",
            "a kernel >= 5.8"),
    Feature("task_storage", "5.11", "bpf_task_storage_get", "syscalls",
            "calls in flight while their thread sleeps wait in a bounded hash by thread id "
            "(freed at thread exit; exact while fewer than max_threads threads block at once)",
            "a kernel >= 5.11 keeps them in task local storage instead"),
    Feature("task_btf", "5.11", "bpf_get_current_task_btf", "syscalls",
            "not needed by the thread-id fallback (used with task_storage)",
            "a kernel >= 5.11"),
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


def _kallsyms_has(text: str, symbol: str) -> bool:
    return re.search(rf"^\S+ [tTwW] {re.escape(symbol)}$", text, re.M) is not None


@functools.lru_cache(maxsize=1)
def probe() -> KernelFeatures:
    """The running kernel's features; an unreadable kallsyms counts every feature present (the
    BPF load then says what is missing)."""
    try:
        text = Path("/proc/kallsyms").read_text()
    except OSError:
        text = ""
    present = {f.name: (_kallsyms_has(text, f.symbol) if text else True) for f in FEATURES}
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
