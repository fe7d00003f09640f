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

from ..config import EbpfConfig
from ..convert import syscalls as conv
from ..model import EbpfEvent, EbpfEventType, Signal
from .base import BccSource, Requirement, fill_process_filter

__all__ = ["SyscallsSource"]

log = logging.getLogger(__name__)

SC_COMM_LEN = 16
SC_MAX_NR = 512   # bpf/syscalls.h


class ScKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("nr", ctypes.c_uint32)]


class ScStat(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("sum_ns", ctypes.c_uint64),
                ("min_ns", ctypes.c_uint64), ("max_ns", ctypes.c_uint64)]


class ScSlowEvent(ctypes.Structure):
    """Mirror of ``struct sc_slow_event`` in ``bpf/syscalls.h``."""

    _fields_ = [("start_ns", ctypes.c_uint64), ("end_ns", ctypes.c_uint64), ("ret", ctypes.c_int64),
                ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("nr", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("comm", ctypes.c_char * SC_COMM_LEN)]


class SyscallsSource(BccSource):
    name = "syscalls"
    bpf_file = "syscalls.bpf.c"
    lost_reasons = ("ringbuf_full", "start_map_full", "series_map_full")

    TRACEPOINTS = ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit", "sched:sched_switch")

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.config = ctx.config.sources.syscalls
        self.report_interval = float(self.config.report_interval)
        self._names = conv.syscall_names()
        self._start_unix_ns = time.time_ns()
        self._comms: dict[int, str] = {}

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        return [Requirement("tracepoint", tp) for tp in cls.TRACEPOINTS]

    def cflags(self) -> list[str]:
        return [f"-DSLOW_THRESHOLD_NS={int(self.config.slow_threshold * 1e9)}ULL",
                f"-DSLOW_SPANS={1 if self.config.slow_spans else 0}",
                f"-DFILTER_ACTIVE={1 if self.config.filter.active else 0}",
                f"-DMAX_SERIES={int(self.config.max_series)}",
                "-DRINGBUF_PAGES=64", *self._kernel_compat_cflags()]

    def _kernel_compat_cflags(self) -> list[str]:
        from .. import kernel_features

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
        bpf["settings"][ctypes.c_int(0)] = ctypes.c_uint32(1)
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
        comm = ev.comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        clock = self.ctx.clock
        start = clock.to_unix_nano(ev.start_ns)
        event = EbpfEvent(EbpfEventType.SYSCALL, ev.pid, ev.tid, start, ev.end_ns - ev.start_ns, comm,
                          {"syscall.name": self.syscall_name(ev.nr), "syscall.nr": ev.nr,
                           "syscall.return_value": ev.ret})
        span = self.ctx.converter.convert_event_to_span(event)
        if span is not None:
            self.ctx.exporter.submit(Signal.TRACES, self.ctx.resources.get(ev.pid, comm), span)

    # ------------------------------------------------------------------ aggregates → metrics

    def collect(self) -> None:
        if self.bpf is None:
            return
        now = time.time_ns()
        start = self._start_unix_ns
        calls: dict[int, list] = {}                  # tgid → [(attrs, count)]
        hists: dict[tuple[int, int], conv.HistPoint] = {}
        for k, per_cpu in self.bpf["calls"].items():
            h = _fold_per_cpu(per_cpu, with_slots=False)
            if h.count:
                hists[(k.tgid, k.nr)] = h
                calls.setdefault(k.tgid, []).append(({"syscall.name": self.syscall_name(k.nr)}, h.count))
        # Host-wide series for nr < SC_MAX_NR: one per-CPU array slot per syscall, stats and
        # log2 histogram together.
        for k, per_cpu in self.bpf["all_calls"].items():
            h = _fold_per_cpu(per_cpu, with_slots=True)
            if h.count:
                nr = k.value
                hists[(0, nr)] = h
                calls.setdefault(0, []).append(({"syscall.name": self.syscall_name(nr)}, h.count))
        for k, per_cpu in self.bpf["hist"].items():
            h = hists.get((k.tgid, k.nr))
            if h is not None:
                n = sum(int(v) for v in per_cpu)
                h.slots[k.slot] = h.slots.get(k.slot, 0) + n
        errs: dict[int, list] = {}
        for k, per_cpu in self.bpf["errors"].items():
            n = sum(int(v) for v in per_cpu)
            if n:
                errs.setdefault(k.tgid, []).append(
                    ({"syscall.name": self.syscall_name(k.nr), "error.type": conv.errno_name(k.err)}, n))
        by_tgid: dict[int, list] = {}
        for (tgid, nr), h in hists.items():
            by_tgid.setdefault(tgid, []).append(({"syscall.name": self.syscall_name(nr)}, h))
        exporter = self.ctx.exporter
        dead = []
        for tgid in sorted(set(calls) | set(errs)):
            resource = self.ctx.resources.host_resource if tgid == 0 else self.ctx.resources.get(tgid)
            if tgid in calls:
                exporter.submit(Signal.METRICS, resource, conv.calls_metric(calls[tgid], start, now))
            if tgid in errs:
                exporter.submit(Signal.METRICS, resource, conv.errors_metric(errs[tgid], start, now))
            if tgid in by_tgid:
                exporter.submit(Signal.METRICS, resource, conv.duration_metric(by_tgid[tgid], start, now))
            if tgid and not os.path.exists(f"/proc/{tgid}"):
                dead.append(tgid)
        if dead:
            self._forget(set(dead))

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
        for tgid in tgids:
            self.ctx.resources.forget(tgid)


def _fold_per_cpu(per_cpu: Any, with_slots: bool) -> conv.HistPoint:
    """Sums one key's per-CPU stat values (count, sum, min, max and optionally log2 slots)."""
    h = conv.HistPoint()
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
