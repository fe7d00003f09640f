"""The CPU profiler's BPF program (``bpf/profiler.bpf.c``): load it, fill its filter maps,
attach its perf events, and drain its per-stack counts into a symbolized ``CpuProfile``.

Both the ``profiler`` source and the library's ``EbpfCpuProfiler`` run the program through this
one class; they differ only in where the profiles go.

Draining swaps generations: the program counts into ``counts<g>``/``stacks<g>`` where ``g`` is
``settings[0]``. ``drain()`` flips ``g``, waits a moment for programs still running on the old
generation, then reads and deletes the old counts in one batch and reads and deletes each
stack they name. Samples that arrive meanwhile go to the other generation, so none is lost and
no stack id is freed while a key still counts on it. Samples the maps refused (stack hash-bucket
collision, full stack or counts map) arrive whole over the ring buffer and are counted here,
into the same profile.

Off-CPU time (``config.off_cpu``): the context-switch software event runs ``on_switch_out`` as
each thread leaves a CPU (the same walk as an on-CPU sample, kept per thread), and the
``sched:sched_switch`` tracepoint adds the time until it runs again to ``offcpu<g>``, drained
with the same generation flip into ``CpuProfile.off_cpu``; each recorded block's nanoseconds are
divided by the sampling probability (docs/profiler.md#off-cpu-time).
"""

from __future__ import annotations

import array
import ctypes
import functools
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

from ..config import CachesConfig, ProfilerSourceConfig
from ..errors import SourceUnavailableError
from ..kernel import features as kernel_features
from ..kernel import host
from ..kernel.bcc import check_mirror, header_defines, header_enum
from ..kernel.filters import fill_process_filter
from ..kernel.identity import CgroupResolver
from ..kernel.libbpf import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE, drain_hash_map, lib
from ..kernel.loader import Program, compile_bpf
from . import links
from .abi import (
    HEADER,
    LOST_REASONS,
    MAX_STACK_DEPTH,
    PROF_KEY,
    REC_NEW_PROCESS,
    REC_RUNTIME_FRAME,
    REC_SAMPLE,
    RUNTIME_MAX_FRAMES,
    SET_GENERATION,
    STAT_NAMES,
    UNWIND_NATIVE_SLOT,
    UNWIND_STAT_NAMES,
    NewProcess,
    ProfKey,
    RuntimeFrameNotice,
    RuntimeProcess,
    RuntimeUnwindStack,
    UnwindMapping,
    UnwindProcess,
    UnwindRow,
    UnwindStack,
    WholeSample,
)
from .model import OFF_CPU, CpuProfile, Frame, StackSample
from .runtimes import RUNTIMES, Runtime, Runtimes, slot_of
from .runtimes.go import GoLabels, GoOffsets
from .symbols.demangle import Demangler
from .symbols.symbolizer import Symbolizer
from .unwind.table_store import UnwindTables

__all__ = ["BPF_FILE", "LOST_REASONS", "CpuSampler"]

log = logging.getLogger(__name__)

BPF_FILE = "profiler.bpf.c"
MAX_PROCESSES = 8192          # seen_processes LRU in the kernel
RINGBUF_PAGES = 256           # 1 MiB: new-process notices and whole samples
MIN_WHOLE_KEYS = 4096        # distinct whole samples kept per interval, at least
PROGRAM = b"on_cpu_sample"
WALK_PROGRAM = b"walk_user_stack"     # tail-called by PROGRAM for processes with unwind tables
# Programs that read the old generation before the flip finish within microseconds (they run
# with interrupts off); this is a wide margin.
GENERATION_SETTLE_S = 0.005
RELOAD_AFTER_S = 60.0         # least time between two reloads of a process's unwind tables

OFFCPU_PROGRAM = b"on_switch_out"     # the context-switch software event's program (off-CPU)
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
_SETTINGS = header_enum(HEADER, "PROF_SET")
SET_OFFCPU_THRESHOLD = _SETTINGS.index("offcpu_threshold")
SET_OFFCPU_MIN_US = _SETTINGS.index("offcpu_min_us")
OFFCPU_STAT_NAMES = header_enum(HEADER, "OFFCPU_STAT")
REC_OFFCPU = header_defines(HEADER)["PROF_REC_OFFCPU"]
OFFCPU_BATCH = 64    # off-CPU stacks read per bpf() call at a drain (about 3 KiB each)

WALKED_BATCH = 256   # walked stacks read per bpf() call at a drain
COUNTS_BATCH = 1024  # counts read per bpf() call at a drain
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _unpack_u64s(buf: Any, offset: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{n}Q", buf, offset)


_RT_LEN_AT, _RT_TRUNCATED_AT = RuntimeUnwindStack.rt_len.offset, RuntimeUnwindStack.rt_truncated.offset
_RT_RUNTIME_AT = RuntimeUnwindStack.rt_runtime.offset
_RT_ID_AT, _RT_AUX_AT = RuntimeUnwindStack.rt_id.offset, RuntimeUnwindStack.rt_aux.offset


@functools.cache
def _rt_structs(n: int) -> tuple[struct.Struct, struct.Struct]:
    """Decoders of n frame ids and n aux values (n ≤ RUNTIME_MAX_FRAMES)."""
    return struct.Struct(f"<{n}Q"), struct.Struct(f"<{n}I")


# A drained count: (pid, tid, comm, cgroup id, user addresses, kernel addresses) → samples
WholeKey = tuple[int, int, bytes, int, tuple[int, ...], tuple[int, ...]]
# Runtime frames of a walked stack: (the runtime's slot, ((id, aux), ...)); (0, ()) for none
RtFrames = tuple[int, tuple[tuple[int, int], ...]]
NO_RT_FRAMES: RtFrames = (0, ())
# What one symbolized stack depends on: (pid, user addresses, kernel addresses, runtime frames)
FramesKey = tuple[int, tuple[int, ...], tuple[int, ...], RtFrames]
# A walked user stack: (addresses, truncated, runtime frames)
Walked = tuple[tuple[int, ...], bool, RtFrames]
# A drained count: pid, tid, user stack id, kernel stack id, cgroup id, comm, user stack hash, n
Count = tuple[int, int, int, int, int, bytes, int, int, int, int]   # ..., count, link span, go labels


def _offcpu_value(user: type[ctypes.Structure]) -> type[ctypes.Structure]:
    class OffCpuValue(ctypes.Structure):
        """``struct offcpu_value``: an off-CPU stack's summed nanoseconds and blocks, both stacks."""

        _fields_ = [("ns", ctypes.c_uint64), ("count", ctypes.c_uint64), ("kernel_len", ctypes.c_uint32),
                    ("pad", ctypes.c_uint32), ("kernel", ctypes.c_uint64 * MAX_STACK_DEPTH), ("user", user)]
    return OffCpuValue


OffCpuValue = _offcpu_value(UnwindStack)                  # RUNTIME_MAX_FRAMES 0
RuntimeOffCpuValue = _offcpu_value(RuntimeUnwindStack)    # with a runtime's frames


def _offcpu_sample(value: type[ctypes.Structure]) -> type[ctypes.Structure]:
    class OffCpuStart(ctypes.Structure):
        _fields_ = [("key", ProfKey), ("v", value)]

    class OffCpuSample(ctypes.Structure):
        """``struct prof_offcpu_sample``: one off-CPU block sent whole over the ring buffer."""

        _fields_ = [("kind", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("rec", OffCpuStart)]
    return OffCpuSample


OFFCPU_SAMPLES = {OffCpuValue: _offcpu_sample(OffCpuValue), RuntimeOffCpuValue: _offcpu_sample(RuntimeOffCpuValue)}
# An off-CPU block sent whole: (pid, tid, comm, cgroup id, user, kernel, runtime frames, truncated)
OffKey = tuple[int, int, bytes, int, tuple[int, ...], tuple[int, ...], RtFrames, bool, int, int]


def offcpu_threshold(probability: float) -> int:
    """settings[PROF_SET_OFFCPU_THRESHOLD] for a sampling probability: a switch-out is recorded
    when a random u32 is at most this, so p = (threshold + 1) / 2^32."""
    return min(0xFFFFFFFF, max(0, round(probability * 2**32) - 1))


def offcpu_scale(threshold: int) -> float:
    """What a recorded block's nanoseconds are multiplied by: 1 / its sampling probability."""
    return 2**32 / (threshold + 1)


class _SwitchEvents:
    """The context-switch software event on every online CPU, each switch running ``prog_fd``
    (sample_period 1; libbpf.attach_perf_event samples at a frequency)."""

    _NR = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319, "s390x": 331}
    _ATTR_SIZE = 112
    _IOC_ENABLE, _IOC_SET_BPF = 0x2400, 0x40042408

    def __init__(self) -> None:
        self.fds: list[int] = []

    def open(self, prog_fd: int) -> None:
        import platform

        from ..kernel.libbpf import online_cpus
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_long]
        nr = self._NR.get(platform.machine())
        if nr is None:
            raise OSError(f"perf_event_open: unknown syscall number on {platform.machine()}")
        attr = (ctypes.c_ubyte * self._ATTR_SIZE)()
        ctypes.c_uint32.from_buffer(attr, 0).value = PERF_TYPE_SOFTWARE
        ctypes.c_uint32.from_buffer(attr, 4).value = self._ATTR_SIZE
        ctypes.c_uint64.from_buffer(attr, 8).value = PERF_COUNT_SW_CONTEXT_SWITCHES
        ctypes.c_uint64.from_buffer(attr, 16).value = 1      # sample_period: every switch
        try:
            for cpu in online_cpus():
                fd = libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_long(-1), ctypes.c_long(cpu),
                                  ctypes.c_long(-1), ctypes.c_ulong(8))   # PERF_FLAG_FD_CLOEXEC
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"perf_event_open (context switches) on cpu {cpu}: {os.strerror(err)}")
                self.fds.append(fd)
                for req, arg in ((self._IOC_SET_BPF, prog_fd), (self._IOC_ENABLE, 0)):
                    if libc.ioctl(fd, req, arg) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"perf event ioctl on cpu {cpu}: {os.strerror(err)}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _executable_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        pass
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class CpuSampler:
    """One loaded profiler program and what user space keeps for it (symbols, process names)."""

    def __init__(self, config: ProfilerSourceConfig, source_name: str = "profiler",
                 caches: CachesConfig | None = None):
        caches = caches or CachesConfig()
        self.config = config
        self.source_name = source_name
        self.frequency = config.sample_frequency
        self.bpf: Any = None
        self.symbolizer = Symbolizer(max_files=config.symbol_cache_size, max_processes=caches.symbol_processes,
                                     max_cached_frames=caches.symbol_frames)
        self.demangler = Demangler(max_entries=caches.demangled_names)
        self.cgroups = CgroupResolver(max_entries=caches.cgroups)
        self.caches = caches
        self._attached = False
        self._generation = 0
        self._generation_start_ns = time.time_ns()
        self._process_names: dict[int, str] = {}   # noted pids → process.executable.name
        self._exited: set[int] = set()             # seen gone at the last drain; forgotten at the next
        self._whole: dict[WholeKey, int] = {}      # ring-buffer samples since the last drain
        self._max_whole = max(config.max_stacks, MIN_WHOLE_KEYS)
        self.whole_lost = 0                        # … beyond _max_whole distinct ones: dropped
        self._stack_leaf: Any = None               # one reusable stack-map lookup buffer
        self._walked_bufs: tuple[Any, Any] | None = None   # batch buffers for the walked stacks
        self._counts_bufs: tuple[Any, Any] | None = None   # and for the counts
        self._drain_lock = threading.Lock()
        self.unwinder: UnwindTables | None = None
        self.truncated_samples = 0                 # samples whose walked user stack stopped early
        self.runtimes: Runtimes | None = None      # the enabled runtimes, once bound
        self.go_labels: GoLabels | None = None     # goroutine labels (runtimes/go.py), when walking
        self._reloaded_at: dict[int, float] = {}   # pid → when its tables were last re-requested
        self.off_cpu = config.off_cpu.enabled
        self.request_links = bool(getattr(config, "request_links", False))   # docs/profiler.md#request-links
        self.traces_ctx_read = bool(getattr(config, "traces_ctx_read", False))   # OBI's traces_ctx_v1
        self.thread_ctx_read = bool(getattr(config, "thread_ctx_read", False))   # OTEP 4947
        self.off_cpu_disabled: str | None = None   # why off-CPU time is off although configured
        self._offcpu_threshold = offcpu_threshold(config.off_cpu.sample_probability)
        self._offcpu_bufs: tuple[Any, Any] | None = None
        self._offcpu_layout: type[ctypes.Structure] = OffCpuValue
        self._switch_events = _SwitchEvents()
        self._whole_off: dict[OffKey, list[int]] = {}   # off-CPU blocks sent whole: [ns, blocks]
        self.whole_off_lost = 0                    # … beyond _max_whole distinct ones: dropped

    # ------------------------------------------------------------------ load / attach

    @property
    def unwinding(self) -> bool:
        """Whether user stacks are walked with unwind tables here (config, and a kernel with
        bpf_task_pt_regs for samples taken in the kernel)."""
        return (self.config.unwind_tables and self.config.user_stacks
                and kernel_features.probe().has("task_pt_regs"))

    @property
    def enabled_runtimes(self) -> list[tuple[int, type[Runtime]]]:
        """(slot, runtime) of each runtime whose frames are walked: the configuration turns it on,
        and it follows the table walk."""
        if not self.unwinding:
            return []
        return [(slot_of(RUNTIMES, cls), cls) for cls in RUNTIMES if cls.enabled(self.config)]

    def cflags(self) -> list[str]:
        c = self.config
        rows = int(c.unwind_table_rows)
        runtimes = self.enabled_runtimes
        unwind = [f"-DUNWIND={1 if self.unwinding else 0}", f"-DUNWIND_ROWS={rows}",
                  f"-DUNWIND_ROW_STEPS={rows.bit_length() + 1}",
                  f"-DUNWIND_PROCESSES={int(c.unwind_processes)}",
                  f"-DRUNTIME_MAX_FRAMES={RUNTIME_MAX_FRAMES if runtimes else 0}",
                  *(flag for _, cls in runtimes for flag in cls.cflags(c))]
        return [*unwind, f"-DMAX_KEYS={int(c.max_stacks)}", f"-DMAX_STACKS={int(c.max_stacks)}",
                f"-DMAX_PROCESSES={MAX_PROCESSES}",
                f"-DUSER_STACKS={1 if c.user_stacks else 0}",
                f"-DKERNEL_STACKS={1 if c.kernel_stacks else 0}",
                f"-DFILTER_PROCESS={1 if c.filter.active else 0}", f"-DRINGBUF_PAGES={RINGBUF_PAGES}",
                f"-DWAKE_EVERY={self._wake_every()}", *self._offcpu_cflags(), *self._link_cflags()]

    def _link_cflags(self) -> list[str]:
        """Request links (receiver/profiling/links.py): the pinned thread -> span map."""
        if not (self.request_links or self.traces_ctx_read or self.thread_ctx_read):
            return []
        f = self.config.filter
        try:
            return links.profiler_cflags(self.request_links, self.traces_ctx_read, self.thread_ctx_read,
                                         pids=list(f.pids) if f.pids and not (f.process_names or f.cgroups) else None)
        except OSError as e:
            log.warning("profiler: no request links: %s", e)
            self.request_links = self.traces_ctx_read = self.thread_ctx_read = False
            return []

    def _offcpu_cflags(self) -> list[str]:
        o = self.config.off_cpu
        if not self.off_cpu:
            return ["-DOFF_CPU=0"]
        return ["-DOFF_CPU=1", f"-DOFFCPU_THREADS={int(o.max_threads)}", f"-DOFFCPU_KEYS={int(o.max_stacks)}"]

    @staticmethod
    def _wake_every() -> int:
        """Whole samples a CPU may leave unread before waking user space: all CPUs together
        then fill at most half the ring buffer."""
        cpus = os.cpu_count() or 1
        return max(1, RINGBUF_PAGES * 4096 // (2 * cpus * ctypes.sizeof(WholeSample)))

    def load(self) -> Any:
        """Compiles the program and loads its perf-event programs, the tail-called walkers stored
        in ``unwind_programs`` (for callers without a ``BccSource`` too); ``bind()`` it next."""
        programs: list[Program] = []
        if self.unwinding:
            programs.append((WALK_PROGRAM.decode(), "PERF_EVENT", ("unwind_programs", UNWIND_NATIVE_SLOT)))
        runtimes = self.enabled_runtimes
        for slot, cls in runtimes:
            programs.append((cls.program, "PERF_EVENT", ("unwind_programs", slot)))
        programs.append((PROGRAM.decode(), "PERF_EVENT", None))
        if self.off_cpu:
            programs.append((OFFCPU_PROGRAM.decode(), "PERF_EVENT", None))
        try:
            cflags = self.cflags()
            pins = links.pins() if self.request_links or self.traces_ctx_read or self.thread_ctx_read else None
            return compile_bpf(self.source_name, BPF_FILE, cflags, programs, pins=pins,
                               includes=[cls.bpf_header for _, cls in runtimes])
        except SourceUnavailableError as e:
            if not self.off_cpu:
                raise
            self._disable_off_cpu(e.reason)   # the CPU profile without it, rather than neither
            return self.load()
        except Exception as e:
            raise SourceUnavailableError(self.source_name, f"the profiler program failed to load: {e}") from e

    def bind(self, bpf: Any) -> None:
        """Fills the filter maps, then attaches the perf events (so filtering holds from the
        first sample)."""
        self.bpf = bpf
        mirrors = [("counts0", "Key", ProfKey), ("mirror_prof_sample", "Leaf", WholeSample),
                   ("mirror_prof_new_process", "Leaf", NewProcess)]
        runtimes = self.enabled_runtimes
        if self.unwinding:
            mirrors += [("walked0", "Key", ProfKey),
                        ("walked0", "Leaf", RuntimeUnwindStack if runtimes else UnwindStack),
                        ("unwind_rows", "Leaf", UnwindRow), ("unwind_processes", "Leaf", UnwindProcess),
                        ("unwind_mappings", "Leaf", UnwindMapping)]
        if runtimes:
            mirrors += [("runtime_processes", "Leaf", RuntimeProcess),
                        ("mirror_prof_runtime_frame", "Leaf", RuntimeFrameNotice)]
            mirrors += [m for _, cls in runtimes for m in cls.mirrors]
        if self.off_cpu:
            self._offcpu_layout = RuntimeOffCpuValue if runtimes else OffCpuValue
            mirrors += [("offcpu0", "Leaf", self._offcpu_layout),
                        ("mirror_prof_offcpu_sample", "Leaf", OFFCPU_SAMPLES[self._offcpu_layout])]
        for map_name, part, mirror in mirrors:
            check_mirror(bpf, map_name, part, mirror, self.source_name)
        if runtimes:
            self.runtimes = Runtimes(bpf, runtimes, self.caches).start()
        if self.unwinding:
            check_mirror(bpf, "go_processes", "Leaf", GoOffsets, self.source_name)
            self.go_labels = GoLabels(bpf, int(self.config.unwind_processes))
            self._ustack_leaf = RuntimeUnwindStack() if runtimes else UnwindStack()
            self.unwinder = UnwindTables(bpf, self.symbolizer, int(self.config.unwind_table_rows),
                                         int(self.config.unwind_processes), self.runtimes).start()
            for rt in self.runtimes or ():
                rt.reload = self._reload_process
        self._stack_leaf = bpf["stacks0"].Leaf()
        f = self.config.filter
        if f.active:
            fill_process_filter(bpf, f, self.source_name)
        self._generation = 0
        self._generation_start_ns = time.time_ns()
        try:   # the loader loaded the programs (and filled unwind_programs); attached here
            bpf.attach_perf_event(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, PROGRAM, self.frequency)
        except Exception as e:
            raise SourceUnavailableError(
                self.source_name, f"cannot open software cpu-clock perf events: {e}", host.FIX_PERF_EVENTS) from e
        self._attached = True
        if self.off_cpu:
            self._attach_off_cpu(bpf)

    def _attach_off_cpu(self, bpf: Any) -> None:
        """Sets sampling and the minimum block, then opens the context-switch events (the
        sched_switch tracepoint is attached since load: it finds no record before this)."""
        min_us = min(round(float(self.config.off_cpu.min_block) * 1e6), 0xFFFFFFFF)
        bpf["settings"][ctypes.c_int(SET_OFFCPU_THRESHOLD)] = ctypes.c_uint32(self._offcpu_threshold)
        bpf["settings"][ctypes.c_int(SET_OFFCPU_MIN_US)] = ctypes.c_uint32(min_us)
        try:
            self._switch_events.open(bpf.prog_fd(OFFCPU_PROGRAM))
        except OSError as e:   # the CPU profile goes on; the sched_switch probe finds no records
            self._disable_off_cpu(f"cannot open context-switch perf events: {e}")

    def _disable_off_cpu(self, reason: str) -> None:
        log.warning("%s: off-CPU time disabled: %s", self.source_name, reason)
        self.off_cpu = False
        self.off_cpu_disabled = reason

    def detach(self) -> None:
        """Closes the perf events: no sample after this returns. Safe to call twice."""
        if self.thread_ctx_read:
            links.stop_thread_ctx()
        if self.unwinder is not None:
            self.unwinder.stop()
        if self.runtimes is not None:
            self.runtimes.stop()
        self._switch_events.close()
        if self._attached and self.bpf is not None:
            self._attached = False
            self.bpf.detach_perf_event(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK)

    # ------------------------------------------------------------------ ring-buffer records

    def on_record(self, data: int) -> None:
        """One ring-buffer record: a new process, a sample sent whole, or a runtime frame id."""
        kind = ctypes.c_uint32.from_address(data).value
        if kind == REC_NEW_PROCESS:
            self._note_process(NewProcess.from_address(data).pid)
        elif kind == REC_SAMPLE:
            self._count_whole(WholeSample.from_address(data))
        elif kind == REC_OFFCPU:
            self._count_whole_offcpu(data)
        elif kind == REC_RUNTIME_FRAME:
            if self.runtimes is not None:
                rec = RuntimeFrameNotice.from_address(data)
                self.runtimes.notice(rec.runtime, rec.pid, rec.id)
        else:
            raise ValueError(f"unknown ring-buffer record kind {kind}")

    def _note_process(self, pid: int) -> None:
        """A process's first sample: capture its mappings now, while it is alive."""
        self.symbolizer.note_process(pid)
        self._process_names[pid] = _executable_name(pid)
        self._exited.discard(pid)
        if self.thread_ctx_read:   # OTEP 4947: its thread contexts, without waiting for the next walk
            links.note_thread_ctx_process(pid)
        if self.unwinder is not None:
            if self.go_labels is not None:   # before the tables: their write renews the kernel's cache
                self.go_labels.note_process(pid)
            self.unwinder.request(pid)

    @property
    def offcpu_record_size(self) -> int:
        """Bytes of a whole off-CPU block record (its layout follows the runtimes in use)."""
        return ctypes.sizeof(OFFCPU_SAMPLES[self._offcpu_layout])

    def _count_whole_offcpu(self, data: int) -> None:
        size = ctypes.sizeof(self._offcpu_layout)
        at = 8 + PROF_KEY.size                     # kind, pad, key
        raw = ctypes.string_at(data, at + size)
        pid, tid, _, _, cgroup_id, comm, _, link, go_labels = PROF_KEY.unpack_from(raw, 8)
        ns, blocks, user, kernel, rt, truncated = self._decode_offcpu(raw, at)
        key = (pid, tid, comm.split(b"\0", 1)[0], cgroup_id, user, kernel, rt, truncated, link, go_labels)
        have = self._whole_off.get(key)
        if have is not None:
            have[0] += ns
            have[1] += blocks
        elif len(self._whole_off) < self._max_whole:
            self._whole_off[key] = [ns, blocks]
        else:
            self.whole_off_lost += blocks

    def _decode_offcpu(self, values: Any, base: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...],
                                                               RtFrames, bool]:
        """One ``struct offcpu_value`` at ``base``: ns, blocks, user and kernel addresses, runtime
        frames, whether the user walk was truncated."""
        layout = self._offcpu_layout
        ustack = RuntimeUnwindStack if layout is RuntimeOffCpuValue else UnwindStack
        ns, blocks = struct.unpack_from("<QQ", values, base)
        kernel = _unpack_u64s(values, base + layout.kernel.offset,
                              min(_U32.unpack_from(values, base + layout.kernel_len.offset)[0], MAX_STACK_DEPTH))
        ub = base + layout.user.offset
        user = _unpack_u64s(values, ub + ustack.ips.offset,
                            min(_U32.unpack_from(values, ub + ustack.len.offset)[0], MAX_STACK_DEPTH))
        with_runtimes = self.runtimes is not None and ustack is RuntimeUnwindStack
        rt = self._runtime_frames(values, ub) if with_runtimes else NO_RT_FRAMES
        truncated = bool(_U32.unpack_from(values, ub + ustack.truncated.offset)[0])
        return ns, blocks, user, kernel, rt, truncated

    def _count_whole(self, rec: WholeSample) -> None:
        key = (rec.pid, rec.tid, rec.comm, rec.cgroup_id,
               tuple(rec.user[: min(rec.user_bytes // 8, MAX_STACK_DEPTH)]),
               tuple(rec.kernel[: min(rec.kernel_bytes // 8, MAX_STACK_DEPTH)]))
        n = self._whole.get(key)
        if n is not None:
            self._whole[key] = n + 1
        elif len(self._whole) < self._max_whole:
            self._whole[key] = 1
        else:
            self.whole_lost += 1

    # ------------------------------------------------------------------ drain

    def drain(self) -> CpuProfile:
        """Everything counted since the previous drain, symbolized. May run in a worker thread
        while the event loop delivers ring-buffer records (``on_record``); one drain at a time."""
        with self._drain_lock:
            return self._drain()

    def _drain(self) -> CpuProfile:
        bpf = self.bpf
        old = self._generation
        self._generation = 1 - old
        bpf["settings"][ctypes.c_int(SET_GENERATION)] = ctypes.c_uint32(self._generation)
        now = time.time_ns()
        profile = CpuProfile(start_unix_nano=self._generation_start_ns,
                             duration_ns=max(now - self._generation_start_ns, 0),
                             frequency_hz=self.frequency)
        self._generation_start_ns = now
        time.sleep(GENERATION_SETTLE_S)

        if self.config.kernel_stacks:
            self.symbolizer.load_kernel_symbols()
        if self.go_labels is not None:
            self.go_labels.reader.begin()   # label sets are read afresh each drain (runtimes/go.py)
        counts = self._take_counts(bpf[f"counts{old}"])
        walked = self._take_walked(bpf[f"walked{old}"]) if self.unwinder is not None else []
        stacks = self._take_stacks(bpf[f"stacks{old}"], counts, walked)
        whole, self._whole = self._whole, {}
        frames_of: dict[FramesKey, tuple[Frame, ...]] = {}
        truncated_pids = set()
        for pid, tid, user_stack_id, kernel_stack_id, cgroup_id, comm, _, n, link, go_labels in counts:
            self._add_sample(profile, frames_of, pid, tid, comm, cgroup_id,
                             stacks.get(user_stack_id, ()), stacks.get(kernel_stack_id, ()), n, link=link,
                             go_labels=go_labels)
        for (pid, tid, _, kernel_stack_id, cgroup_id, comm, _, n, link, go_labels), (user, truncated, rt) in walked:
            if truncated:
                self.truncated_samples += n
                truncated_pids.add(pid)
            self._add_sample(profile, frames_of, pid, tid, comm, cgroup_id,
                             user, stacks.get(kernel_stack_id, ()), n, rt, link=link, go_labels=go_labels)
        for (pid, tid, comm, cgroup_id, user, kernel), n in whole.items():
            self._add_sample(profile, frames_of, pid, tid, comm, cgroup_id, user, kernel, n)
        if self.off_cpu:
            profile.off_cpu = self._take_offcpu(bpf[f"offcpu{old}"], profile, frames_of, truncated_pids)
        self.demangler.apply(profile)
        self._forget_exited()
        self._reload_truncated(truncated_pids)
        return profile

    def _reload_process(self, pid: int) -> None:
        """A runtime's process not set up yet at its first sample (a JVM's launcher before
        libjvm): its mappings captured again and its tables reloaded, which recognises it anew."""
        if self.unwinder is not None:
            self.symbolizer.note_process(pid)
            self.unwinder.request(pid)

    def _reload_truncated(self, pids: set[int]) -> None:
        """Processes whose walks stopped early may have mapped code since their mappings were
        captured (dlopen): capture them again and reload, at most once a minute per process."""
        if self.unwinder is None:
            return
        now = time.monotonic()
        for pid in pids:
            if now - self._reloaded_at.get(pid, float("-inf")) >= RELOAD_AFTER_S and os.path.exists(f"/proc/{pid}"):
                self._reloaded_at[pid] = now
                self.symbolizer.note_process(pid)
                self.unwinder.request(pid)
        if len(self._reloaded_at) > 4 * MAX_PROCESSES:
            self._reloaded_at = {p: t for p, t in self._reloaded_at.items() if now - t < RELOAD_AFTER_S}

    def _add_sample(self, profile: CpuProfile, frames_of: dict[FramesKey, tuple[Frame, ...]],
                    pid: int, tid: int, comm: bytes, cgroup_id: int,
                    user: tuple[int, ...], kernel: tuple[int, ...], count: int,
                    rt: RtFrames = NO_RT_FRAMES, events: int | None = None, link: int = 0,
                    go_labels: int = 0) -> None:
        """Symbolizes (once per process and stack within a drain) and appends one sample
        (``events``: the samples or blocks behind ``count``, when that is a time)."""
        fk = (pid, user, kernel, rt)
        frames = frames_of.get(fk)
        if frames is None:
            frames = self.symbolizer.symbolize(pid, user, kernel)
            if rt[1] and self.runtimes is not None:
                frames = self.runtimes.place(rt[0], pid, frames, rt[1], count if events is None else events)
            frames_of[fk] = frames
        name = self._process_names.get(pid)
        if name is None:   # its notice was lost, or it was announced before we bound
            name = self._process_names[pid] = _executable_name(pid)
        profile.samples.append(StackSample(
            frames=frames, count=count, pid=pid, tid=tid,
            thread_name=comm.decode("utf-8", "replace"), process_name=name,
            container_id=self.cgroups.container_id(cgroup_id), cgroup_id=cgroup_id, link_span=link,
            labels=self.go_labels.reader.labels(pid, go_labels) if go_labels and self.go_labels else ()))

    def _take_counts(self, table: Any) -> list[Count]:
        """Reads and deletes the drained generation's counts, COUNTS_BATCH per bpf() call, as
        plain tuples (BCC's batch read allocates ctypes arrays for the whole map and makes an
        object per key and value)."""
        if self._counts_bufs is None:
            self._counts_bufs = (ctypes.create_string_buffer(PROF_KEY.size * COUNTS_BATCH),
                                 ctypes.create_string_buffer(8 * COUNTS_BATCH))
        out: list[Count] = []
        key_size = PROF_KEY.size
        for keys, values, n in drain_hash_map(table.map_fd, key_size, self._counts_bufs):
            for i in range(n):
                pid, tid, uid, kid, cgroup_id, comm, uhash, link, go_labels = PROF_KEY.unpack_from(keys, i * key_size)
                out.append((pid, tid, uid, kid, cgroup_id, comm.split(b"\0", 1)[0], uhash,
                            _U64.unpack_from(values, i * 8)[0], link, go_labels))
        return out

    def _take_stacks(self, table: Any, counts: list[Count],
                     walked: list[tuple[Count, Walked]]) -> dict[int, tuple[int, ...]]:
        """Reads and deletes every stack the drained counts name, then any stack left over
        (one whose count could not be stored)."""
        fd = table.map_fd
        lookup, delete = lib().bpf_map_lookup_elem, lib().bpf_map_delete_elem
        leaf = self._stack_leaf
        ids = {c[2] for c in counts} | {c[3] for c in counts} | {c[3] for c, _ in walked}
        ids.discard(-1)
        out: dict[int, tuple[int, ...]] = {}
        key = ctypes.c_uint32()
        for sid in ids:
            key.value = sid
            if lookup(fd, ctypes.byref(key), ctypes.byref(leaf)) == 0:
                ips = array.array("Q", bytes(leaf))   # 8x faster than iterating the ctypes array
                try:
                    ips = ips[: ips.index(0)]
                except ValueError:
                    pass
                out[sid] = tuple(ips)
            delete(fd, ctypes.byref(key))
        for left in list(table.keys()):
            delete(fd, ctypes.byref(left))
        return out

    def _take_walked(self, table: Any) -> list[tuple[Count, Walked]]:
        """Reads and deletes the drained generation's walked samples: each key (as a count)
        with its stack (addresses, truncated, runtime frames as (id, aux)), WALKED_BATCH entries
        per bpf() call. A stack shared by several keys (threads) is decoded once, by its hash."""
        layout = type(self._ustack_leaf)
        size = ctypes.sizeof(layout)
        count_at = layout.count.offset
        len_at, truncated_at, ips_at = layout.len.offset, layout.truncated.offset, layout.ips.offset
        with_runtimes = self.runtimes is not None and layout is RuntimeUnwindStack
        key_size = PROF_KEY.size
        decoded: dict[int, Walked] = {}
        out: list[tuple[Count, Walked]] = []
        for keys, values, n in drain_hash_map(table.map_fd, key_size, self._walked_buffers(key_size, size)):
            for i in range(n):
                base = i * size
                pid, tid, uid, kid, cgroup_id, comm, uhash, link, go_labels = PROF_KEY.unpack_from(keys, i * key_size)
                stack = decoded.get(uhash)
                if stack is None:
                    depth = min(_U32.unpack_from(values, base + len_at)[0], MAX_STACK_DEPTH)
                    ips = _unpack_u64s(values, base + ips_at, depth)
                    rt = self._runtime_frames(values, base) if with_runtimes else NO_RT_FRAMES
                    truncated = bool(_U32.unpack_from(values, base + truncated_at)[0])
                    stack = decoded[uhash] = (ips, truncated, rt)
                out.append(((pid, tid, uid, kid, cgroup_id, comm.split(b"\0", 1)[0], uhash,
                             _U64.unpack_from(values, base + count_at)[0], link, go_labels), stack))
        return out

    def _take_offcpu(self, table: Any, cpu: CpuProfile, frames_of: dict[FramesKey, tuple[Frame, ...]],
                     truncated_pids: set[int]) -> CpuProfile:
        """Reads and deletes the drained generation's off-CPU stacks (and takes the blocks sent
        whole since the last drain) into a profile of the same interval whose sample counts are
        nanoseconds, each divided by the sampling probability."""
        size = ctypes.sizeof(self._offcpu_layout)
        scale = offcpu_scale(self._offcpu_threshold)
        key_size = PROF_KEY.size
        if self._offcpu_bufs is None:
            self._offcpu_bufs = (ctypes.create_string_buffer(key_size * OFFCPU_BATCH),
                                 ctypes.create_string_buffer(size * OFFCPU_BATCH))
        out = CpuProfile(start_unix_nano=cpu.start_unix_nano, duration_ns=cpu.duration_ns,
                         frequency_hz=cpu.frequency_hz, sample_type=OFF_CPU)
        for keys, values, n in drain_hash_map(table.map_fd, key_size, self._offcpu_bufs):
            for i in range(n):
                pid, tid, _, _, cgroup_id, comm, _, link, go_labels = PROF_KEY.unpack_from(keys, i * key_size)
                ns, blocks, user, kernel, rt, truncated = self._decode_offcpu(values, i * size)
                if truncated and self.unwinder is not None:
                    truncated_pids.add(pid)
                out.blocks += blocks
                self._add_sample(out, frames_of, pid, tid, comm.split(b"\0", 1)[0], cgroup_id,
                                 user, kernel, round(ns * scale), rt, blocks, link, go_labels)
        whole, self._whole_off = self._whole_off, {}
        for (pid, tid, comm, cgroup_id, user, kernel, rt, _, link, go_labels), (ns, blocks) in whole.items():
            out.blocks += blocks
            self._add_sample(out, frames_of, pid, tid, comm, cgroup_id, user, kernel, round(ns * scale), rt, blocks,
                             link, go_labels)
        return out

    def offcpu_stats(self) -> dict[str, int]:
        """The off-CPU counters (OFFCPU_STAT_*: switch-outs recorded, passed over by sampling,
        filtered, without a user stack; blocks counted, too short), summed over CPUs; empty when off."""
        if not self.off_cpu or self.bpf is None:
            return {}
        try:
            return dict(zip(OFFCPU_STAT_NAMES, self._per_cpu_totals("offcpu_stats", len(OFFCPU_STAT_NAMES))))
        except Exception:   # noqa: BLE001 -- closed meanwhile (scraped during shutdown)
            return {}

    def _runtime_frames(self, values: Any, base: int) -> RtFrames:
        m = min(_U32.unpack_from(values, base + _RT_LEN_AT)[0], RUNTIME_MAX_FRAMES)
        if not m:
            return NO_RT_FRAMES
        slot = _U32.unpack_from(values, base + _RT_RUNTIME_AT)[0]
        if _U32.unpack_from(values, base + _RT_TRUNCATED_AT)[0] and self.runtimes is not None:
            rt = self.runtimes.by_slot.get(slot)
            if rt is not None:
                rt.truncated_stacks += 1
        ids, aux = _rt_structs(m)
        return slot, tuple(zip(ids.unpack_from(values, base + _RT_ID_AT),
                               aux.unpack_from(values, base + _RT_AUX_AT)))

    def _walked_buffers(self, key_size: int, value_size: int) -> tuple[Any, Any]:
        """Key and value buffers for WALKED_BATCH entries, allocated once (about 0.5 MiB)."""
        if self._walked_bufs is None:
            self._walked_bufs = (ctypes.create_string_buffer(key_size * WALKED_BATCH),
                                 ctypes.create_string_buffer(value_size * WALKED_BATCH))
        return self._walked_bufs

    def unwind_stats(self) -> dict[str, int]:
        """The kernel walker's counters (UNWIND_STAT_*), summed over CPUs; empty when off."""
        if self.unwinder is None or self.bpf is None:
            return {}
        try:
            return dict(zip(UNWIND_STAT_NAMES, self._per_cpu_totals("unwind_stats", len(UNWIND_STAT_NAMES))))
        except Exception:   # noqa: BLE001 -- closed meanwhile (scraped during shutdown)
            return {}

    def runtime(self, name: str) -> Runtime | None:
        """The running runtime called ``name`` (e.g. "cpython"), or None: off, or not loaded."""
        return self.runtimes.named(name) if self.runtimes is not None else None

    def runtime_stats(self, name: str) -> dict[str, int]:
        """A runtime's counters: its walker's (summed over CPUs) and user space's (processes
        loaded, frames named or not, ...); empty when it is not running."""
        rt = self.runtime(name) if self.bpf is not None else None
        return rt.all_stats() if rt is not None else {}

    def _forget_exited(self) -> None:
        """Frees what is kept for processes found gone at the previous drain: their last
        samples (counted in the generation active then) have now been read."""
        gone = self._exited
        self._exited = set()
        seen = self.bpf["seen_processes"]
        for pid in gone:
            if self.unwinder is not None:
                self.unwinder.forget(pid)
            self.symbolizer.forget(pid)
            if self.go_labels is not None:
                self.go_labels.forget(pid)
            self._process_names.pop(pid, None)
            try:
                del seen[seen.Key(pid)]   # a recycled pid is announced afresh
            except KeyError:
                pass
        for pid in list(self._process_names):   # the event loop may add pids meanwhile
            if not os.path.exists(f"/proc/{pid}"):
                self._exited.add(pid)

    # ------------------------------------------------------------------ counters

    def lost_totals(self) -> list[int]:
        """Cumulative losses per ``LOST_REASONS`` slot, summed over CPUs (plus, as collisions,
        whole samples dropped in user space beyond the bound)."""
        totals = self._per_cpu_totals("lost", len(LOST_REASONS))
        totals[LOST_REASONS.index("stack_collision")] += self.whole_lost
        totals[LOST_REASONS.index("offcpu_map_full")] += self.whole_off_lost
        return totals

    def stats(self) -> dict[str, int]:
        """Cumulative samples by fate (counted, idle, filtered, dropped), summed over CPUs."""
        return dict(zip(STAT_NAMES, self._per_cpu_totals("stats", len(STAT_NAMES))))

    def _per_cpu_totals(self, name: str, n: int) -> list[int]:
        table = self.bpf[name]
        return [sum(int(v) for v in table[ctypes.c_int(i)]) for i in range(n)]

    def close(self) -> None:
        """Detaches and unloads (for callers without a ``BccSource``, which does its own)."""
        if self.bpf is not None:
            self.detach()
            self.bpf.cleanup()
            self.bpf = None
