"""System-call source (``bpf/syscalls.bpf.c``): per-syscall counts, errors by errno and latency
histograms aggregated in the kernel, exported as cumulative OTLP metrics every ``report_interval``;
calls slower than ``slow_threshold`` as spans.

Host-wide series (all processes) go out with the host resource; per-process series only for the
processes the filter selects (pids, comm names, cgroups — kept in BPF maps), with that process's
resource. The kernel maps are read without deleting, so the values are cumulative since attach.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Any

from ..aggregates import HistPoint
from ..config import EbpfConfig
from ..kernel.bcc import header_enum
from ..kernel.filters import fill_process_filter
from ..kernel.syscall_table import errno_name, syscall_names
from ..records import SlowSyscall, SyscallSeries, SyscallSnapshot
from .base import BccSource, Requirement

__all__ = ["SyscallsSource"]

log = logging.getLogger(__name__)

SC_COMM_LEN = 16
SC_MAX_NR = 512   # bpf/syscalls.h


class ScSlowEvent(ctypes.Structure):
    """Mirror of ``struct sc_slow_event`` in ``bpf/syscalls.h``."""

    _fields_ = [("start_ns", ctypes.c_uint64), ("end_ns", ctypes.c_uint64), ("ret", ctypes.c_int64),
                ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("nr", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("comm", ctypes.c_char * SC_COMM_LEN)]


class SyscallsSource(BccSource):
    name = "syscalls"
    bpf_file = "syscalls.bpf.c"
    lost_reasons = header_enum("syscalls.h", "SC_LOST")
    mirrors = (("mirror_sc_slow_event", "Leaf", ScSlowEvent),)
    min_record_size = ctypes.sizeof(ScSlowEvent)

    TRACEPOINTS = ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit", "sched:sched_switch")

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.config = ctx.config.sources.syscalls
        self.report_interval = float(self.config.report_interval)
        self._names = syscall_names()
        self._start_unix_ns = time.time_ns()
        self._seen: set[int] = set()   # processes with series at the last read

    # With a process filter: its cached decisions are taken again after these.
    FILTER_TRACEPOINTS = ("task:task_rename", "cgroup:cgroup_attach_task")

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        tps = cls.TRACEPOINTS + (cls.FILTER_TRACEPOINTS if config.sources.syscalls.filter.active else ())
        return [Requirement("tracepoint", tp) for tp in tps]

    def cflags(self) -> list[str]:
        return [f"-DSLOW_THRESHOLD_NS={int(self.config.slow_threshold * 1e9)}ULL",
                f"-DSLOW_SPANS={1 if self.config.slow_spans else 0}",
                f"-DFILTER_PROCESS={1 if self.config.filter.active else 0}",
                f"-DMAX_SERIES={int(self.config.max_series)}",
                f"-DMAX_THREADS={int(self.config.max_threads)}",
                "-DRINGBUF_PAGES=64", *self._kernel_compat_cflags()]

    def _kernel_compat_cflags(self) -> list[str]:
        from ..kernel import features as kernel_features

        for f in kernel_features.degradations(self.name):
            log.warning("syscalls: kernel without %s (added in %s): %s", f.name, f.since, f.without)
        return kernel_features.syscalls_cflags()

    def syscall_name(self, nr: int) -> str:
        return self._names.get(nr) or f"syscall_{nr}"

    def configure(self, bpf: Any) -> None:
        self._configure_slow_exclude(bpf)
        f = self.config.filter
        self._start_unix_ns = time.time_ns()
        if not f.active:
            return
        fill_process_filter(bpf, f, self.name)
        # Decisions cached while the maps were empty are taken again.
        gen = bpf["sel_gen"]
        gen[ctypes.c_int(0)] = ctypes.c_uint64(gen[ctypes.c_int(0)].value + 1)
        self._start_unix_ns = time.time_ns()

    def _configure_slow_exclude(self, bpf: Any) -> None:
        numbers = {name: nr for nr, name in self._names.items()}
        skip = bpf["slow_skip"]
        unknown = []
        for name in self.config.slow_exclude:
            nr = numbers.get(name)
            if nr is None:
                unknown.append(name)
            elif nr < SC_MAX_NR:
                skip[ctypes.c_int(nr)] = ctypes.c_uint8(1)
        if unknown:  # names differ between architectures (e.g. no epoll_wait on arm64)
            log.info("syscalls: slow_exclude names not on this architecture: %s", ", ".join(unknown))

    # ------------------------------------------------------------------ slow calls → spans

    def handle_event(self, data: int, size: int) -> None:
        ev = ScSlowEvent.from_address(data)
        self._received.inc()
        self.ctx.consumer.consume_event(SlowSyscall(
            ev.pid, ev.tid, ev.comm.split(b"\0", 1)[0].decode("utf-8", "replace"), ev.nr,
            self.syscall_name(ev.nr), ev.ret, self.ctx.clock.to_unix_nano(ev.start_ns), ev.end_ns - ev.start_ns))

    # ------------------------------------------------------------------ aggregates → metrics

    def collect(self) -> None:
        # Which processes are gone is asked *before* the maps are read: a process gone then made
        # all its calls, so the read has them. Asked after the read, a process that made its
        # calls and ended in between had them deleted unsent by _forget (the kernel guests'
        # syscalls smoke test lost a short-lived process's series so). A process that ends after
        # the read is found gone at the next collect, which sends its final values.
        dead = {tgid for tgid in self._seen if not os.path.exists(f"/proc/{tgid}")}
        by_pid: dict[int, SyscallSeries] = {}
        hists: dict[tuple[int, int], HistPoint] = {}

        def series(tgid: int) -> SyscallSeries:
            s = by_pid.get(tgid)
            if s is None:
                s = by_pid[tgid] = SyscallSeries()
            return s

        for k, per_cpu in self.bpf["calls"].items():
            h = _fold_per_cpu(per_cpu, with_slots=False)
            if h.count:
                hists[(k.tgid, k.nr)] = h
        # Host-wide series for nr < SC_MAX_NR: one per-CPU array slot per syscall, stats and
        # log2 histogram together.
        for k, per_cpu in self.bpf["all_calls"].items():
            h = _fold_per_cpu(per_cpu, with_slots=True)
            if h.count:
                hists[(0, k.value)] = h
        for k, per_cpu in self.bpf["hist"].items():
            h = hists.get((k.tgid, k.nr))
            if h is not None:
                n = sum(int(v) for v in per_cpu)
                h.slots[k.slot] = h.slots.get(k.slot, 0) + n
        for (tgid, nr), h in hists.items():
            s = series(tgid)
            name = self.syscall_name(nr)
            s.calls.append((name, h.count))
            s.durations.append((name, h))
        for k, per_cpu in self.bpf["errors"].items():
            n = sum(int(v) for v in per_cpu)
            if n:
                series(k.tgid).errors.append((self.syscall_name(k.nr), errno_name(k.err), n))
        comms = {k.value: v.comm.split(b"\0", 1)[0].decode("utf-8", "replace")
                 for k, v in self.bpf["series_comm"].items()}
        for tgid, s in by_pid.items():
            s.comm = comms.get(tgid, "")
        self._seen = {tgid for tgid in by_pid if tgid} - dead
        self.ctx.consumer.consume_metrics(SyscallSnapshot(self._start_unix_ns, time.time_ns(), by_pid, dead))
        if dead:   # their final values went out above
            self._forget(dead)

    def _forget(self, tgids: set[int]) -> None:
        """A finished process's series went out once more with its final values; free its map
        entries so the per-process series stay bounded."""
        for table in ("calls", "errors", "hist"):
            t = self.bpf[table]
            for k in [k for k in t.keys() if k.tgid in tgids]:
                try:
                    del t[k]
                except KeyError:
                    pass
        names = self.bpf["series_comm"]
        for tgid in tgids:
            try:
                del names[ctypes.c_uint32(tgid)]
            except KeyError:
                pass


def _fold_per_cpu(per_cpu: Any, with_slots: bool) -> HistPoint:
    """Sums one key's per-CPU stat values (count, sum, min, max and optionally log2 slots)."""
    h = HistPoint()
    for v in per_cpu:
        if not v.count:
            continue
        h.count += v.count
        h.sum_ns += v.sum_ns
        if v.min_ns and (h.min_ns == 0 or v.min_ns < h.min_ns):
            h.min_ns = v.min_ns
        h.max_ns = max(h.max_ns, v.max_ns)
        if with_slots:
            for slot, n in enumerate(v.slots):
                if n:
                    h.slots[slot] = h.slots.get(slot, 0) + n
    return h
