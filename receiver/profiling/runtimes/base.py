"""The seam between the CPU profiler and a language runtime whose frames the native walk cannot
name (an interpreter, a JIT): what a runtime implements, and ``Runtimes``, which runs the
enabled ones for one loaded profiler program.

A runtime is one module here, one ``bpf/runtimes/<name>.bpf.h`` and one row in ``RUNTIMES``
(``runtimes/__init__.py``). Its parts:

* **Kernel side** (``bpf_header``): a BPF program ``program`` that the native walker tail-calls
  (``unwind_programs[slot]``) for samples of a process whose ``runtime_processes`` entry names
  the runtime's slot. It reads the runtime's per-process data from ``ws->rt.data`` (a struct it
  defines, at most ``RUNTIME_DATA_BYTES``), records frames as (id, aux) pairs with
  ``runtime_record`` / ``runtime_end_group``, and ends with ``finish_walk``.
* **Recognition** (``recognise``): from a process's executable mappings (and the ELF files behind
  them), whether it runs this runtime; if so, the bytes of its per-process data. ``Runtimes``
  writes the kernel entry; the runtime keeps what it needs to name frames.
* **Naming** (``notice``, ``frames``, ``place``): a frame id announced over the ring buffer the
  first time a process's stacks name it (read it while the process lives); at drain the recorded
  pairs become ``Frame``s of ``frame_type`` (``profile.frame.type``), placed among the native
  frames.
* **Self-metrics** (``watch``): its counters and caches, registered once by the profiler source.
"""

from __future__ import annotations

import ctypes
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self

from ...config import CachesConfig, ProfilerSourceConfig
from ..abi import RUNTIME_SLOTS, UNWIND_NATIVE_SLOT, RuntimeProcess
from ..model import Frame

__all__ = ["Region", "RecordedFrames", "QueuedRuntime", "Runtime", "Runtimes"]

log = logging.getLogger(__name__)

# One executable mapping, as the symbolizer captures it: (start, end, bias or None, path, build id,
# anonymous)
Region = tuple[int, int, int | None, str, str, bool]
# A walked stack's runtime frames as the kernel recorded them, innermost first: (id, aux)
RecordedFrames = Sequence[tuple[int, int]]


class Runtime(ABC):
    """One runtime's user side, for one loaded profiler program (one instance per program)."""

    name: ClassVar[str]                 # e.g. "cpython": logs, self-metrics, runtime_stats()
    frame_type: ClassVar[str]           # profile.frame.type of its frames
    bpf_header: ClassVar[str]           # its walker, relative to bpf/: "runtimes/cpython.bpf.h"
    program: ClassVar[str]              # the walker's BPF function, tail-called at its slot
    stats_map: ClassVar[str | None] = None      # its per-CPU counters in the program …
    stat_names: ClassVar[tuple[str, ...]] = ()  # … and their names, by slot
    mirrors: ClassVar[Sequence[tuple[str, str, Any]]] = ()   # (map, "Key"/"Leaf", ctypes mirror) to check
    caches: ClassVar[tuple[str, ...]] = ()      # its cache names (each listed in telemetry.CACHES)
    # set by the sampler: captures a process's mappings again and reloads it (queued, any thread)
    reload: Callable[[int], None] | None = None

    def __init__(self, bpf: Any, caches: CachesConfig) -> None:
        self.bpf = bpf
        self.stats: Counter[str] = Counter()    # user-space events (processes_loaded, ...)
        self.misaligned_samples = 0             # samples whose frames could not be placed one to one
        self.truncated_stacks = 0               # walked stacks whose runtime frames were cut short

    # ------------------------------------------------------------------ class-level: config, program

    @classmethod
    @abstractmethod
    def enabled(cls, config: ProfilerSourceConfig) -> bool:
        """Whether the configuration turns this runtime on (its walker is then compiled in)."""

    @classmethod
    def cflags(cls, config: ProfilerSourceConfig) -> list[str]:
        """-D flags its walker needs beyond the profiler's."""
        return []

    @classmethod  # noqa: B027 -- optional
    def watch(cls, telemetry: Any, runtime: Callable[[], Runtime | None], caches: CachesConfig) -> None:
        """Registers its self-metrics; ``runtime()`` is the running instance, or None (not loaded,
        or off)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Starts its background work (e.g. reading frame names off the drain)."""
        return self

    def stop(self, timeout: float = 5.0) -> None:  # noqa: B027 -- optional
        """Ends its background work."""

    def wait_idle(self, timeout: float) -> bool:
        """For tests and tools: whether queued work was done within ``timeout`` seconds."""
        return True

    # ------------------------------------------------------------------ processes and frames

    @abstractmethod
    def recognise(self, pid: int, regions: Sequence[Region]) -> bytes | None:
        """The per-process data for the kernel when ``pid`` runs this runtime (its mappings are
        ``regions``), else None. Runs on the unwinder's worker thread; counts its own failures."""

    @abstractmethod
    def forget(self, pid: int) -> None:
        """``pid`` is gone (or its kernel entry could not be written): drop what is kept for it."""

    def notice(self, pid: int, frame_id: int) -> None:  # noqa: B027 -- optional
        """The kernel saw ``frame_id`` in ``pid``'s stacks for the first time (never blocks)."""

    @abstractmethod
    def frames(self, pid: int, recorded: RecordedFrames) -> list[tuple[Frame, bool]]:
        """The recorded frames as (frame, last of its group), innermost first."""

    def place(self, native: Sequence[Frame], frames: Sequence[tuple[Frame, bool]]) -> tuple[tuple[Frame, ...], bool]:
        """The stack (leaf first) with the runtime's frames placed among the native ones, and
        whether they lined up. By default they go on the leaf side of the native frames."""
        return (*(f for f, _ in frames), *native), True

    # ------------------------------------------------------------------ counters

    def counters(self) -> dict[str, int]:
        """Its user-space counters (``stats`` by default)."""
        return dict(self.stats)

    def kernel_stats(self) -> dict[str, int]:
        """Its walker's per-CPU counters, summed; empty when it has none (or the program closed)."""
        if not self.stats_map:
            return {}
        try:
            table = self.bpf[self.stats_map]
            return {name: sum(int(v) for v in table[ctypes.c_int(i)]) for i, name in enumerate(self.stat_names)}
        except Exception:   # noqa: BLE001 -- closed meanwhile (scraped during shutdown)
            return {}

    def all_stats(self) -> dict[str, int]:
        """Kernel and user-space counters together, as ``CpuSampler.runtime_stats`` reports them."""
        return {**self.kernel_stats(), **self.counters(), "misaligned_samples": self.misaligned_samples,
                "truncated_stacks": self.truncated_stacks}


class QueuedRuntime(Runtime):
    """A runtime that names frames on its own thread: ``self._worker``, a ``QueueWorker`` its
    ``__init__`` creates, is started, stopped and waited for here."""

    _worker: Any

    def start(self) -> Self:
        self._worker.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._worker.stop(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """For tests: whether the frames queued so far were named within ``timeout`` seconds."""
        return self._worker.wait_idle(timeout)


def slot_of(classes: Sequence[type[Runtime]], cls: type[Runtime]) -> int:
    """A runtime's ``unwind_programs`` slot: its place in the registration table, after the
    native walker's (stable whichever runtimes are enabled)."""
    slot = UNWIND_NATIVE_SLOT + 1 + list(classes).index(cls)
    if slot >= RUNTIME_SLOTS:
        raise ValueError(f"more runtimes than RUNTIME_SLOTS - 1 ({RUNTIME_SLOTS - 1}): raise it in bpf/profiler.h")
    return slot


class Runtimes:
    """The enabled runtimes of one loaded profiler program: recognises processes (first runtime
    that claims one wins), keeps ``runtime_processes`` in step, and routes notices and frames."""

    def __init__(self, bpf: Any, enabled: Sequence[tuple[int, type[Runtime]]], caches: CachesConfig) -> None:
        self._map = bpf["runtime_processes"]
        self.by_slot: dict[int, Runtime] = {slot: cls(bpf, caches) for slot, cls in enabled}
        self._slot_of: dict[int, int] = {}      # pid → the slot of the runtime it runs

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_slot.values())

    def named(self, name: str) -> Runtime | None:
        return next((rt for rt in self.by_slot.values() if rt.name == name), None)

    def start(self) -> Self:
        for rt in self.by_slot.values():
            rt.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:  # noqa: B027 -- optional
        for rt in self.by_slot.values():
            rt.stop(timeout)

    def load(self, pid: int, regions: Sequence[Region]) -> None:
        """A process whose tables were just loaded: the runtime it runs, if any, gets its kernel
        entry (a process whose entry cannot be written keeps native frames only)."""
        for slot, rt in self.by_slot.items():
            data = rt.recognise(pid, regions)
            if data is None:
                continue
            try:
                self._map[self._map.Key(pid)] = RuntimeProcess.of(slot, data)
            except Exception as e:   # noqa: BLE001 -- full map
                rt.forget(pid)
                rt.stats["processes_over_limit"] += 1
                log.debug("runtime_processes[%d] (%s): %s", pid, rt.name, e)
                return
            self._slot_of[pid] = slot
            rt.stats["processes_loaded"] += 1
            return

    def forget(self, pid: int) -> None:
        """``pid`` is gone: its kernel entry and what its runtime keeps go."""
        slot = self._slot_of.pop(pid, None)
        if slot is None:
            return
        try:
            del self._map[self._map.Key(pid)]
        except KeyError:
            pass
        self.by_slot[slot].forget(pid)

    def notice(self, slot: int, pid: int, frame_id: int) -> None:
        rt = self.by_slot.get(slot)
        if rt is not None:
            rt.notice(pid, frame_id)

    def place(self, slot: int, pid: int, native: tuple[Frame, ...], recorded: RecordedFrames,
              count: int) -> tuple[Frame, ...]:
        """``native`` with the runtime frames of a walked stack placed among them (``count``
        samples: counted as misaligned when the frames did not line up)."""
        rt = self.by_slot.get(slot)
        if rt is None:
            return native
        frames, aligned = rt.place(native, rt.frames(pid, recorded))
        if not aligned:
            rt.misaligned_samples += count
        return frames
