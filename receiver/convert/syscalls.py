"""System-call aggregates and slow calls → OTLP: cumulative ``syscall.calls`` / ``syscall.errors``
Sums, a ``syscall.duration`` ExponentialHistogram (scale 0), and slow-call Spans.

Histogram buckets come from the kernel's log2 slots: slot ``k`` counts durations in
``[2^k, 2^(k+1))`` ns. At scale 0 OTLP bucket index ``k`` covers ``(2^k, 2^(k+1)]``, so slot ``k`` is
put in bucket ``k``; the only difference is a duration of exactly a power of two, which lands one
bucket higher than OTLP would put it (a boundary approximation; count, sum, min and max are exact).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ..model import EbpfEvent, EbpfEventType
from .converter import register
from .resource import to_key_values

__all__ = ["syscall_names", "errno_name", "calls_metric", "errors_metric", "duration_metric",
           "slow_call_span", "HistPoint", "syscall_event_to_span", "syscall_event_to_metric"]

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA

# Kernel-internal codes that can reach sys_exit but are not in userspace errno.h.
_KERNEL_ERRNOS = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
                  515: "ENOIOCTLCMD", 516: "ERESTART_RESTARTBLOCK", 517: "EPROBE_DEFER",
                  518: "EOPENSTALE", 519: "ENOPARAM"}

_UNISTD = {"x86_64": "x86_64-linux-gnu/asm/unistd_64.h", "aarch64": "aarch64-linux-gnu/asm/unistd.h"}


def errno_name(err: int) -> str:
    return errno.errorcode.get(err) or _KERNEL_ERRNOS.get(err) or f"E{err}"


def _from_header(path: Path) -> dict[int, str]:
    out = {}
    for m in re.finditer(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$", path.read_text(), re.M):
        out[int(m.group(2))] = m.group(1)
    return out


# Since Linux 5.1 new system calls get one number on every architecture (alpha aside): 424 on.
# BCC's built-in table (x86_64) ends at 334, so these complete it.
_COMMON_SINCE_424 = (
    "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "pidfd_open", "clone3",
    "close_range", "openat2", "pidfd_getfd", "faccessat2", "process_madvise", "epoll_pwait2",
    "mount_setattr", "quotactl_fd", "landlock_create_ruleset", "landlock_add_rule",
    "landlock_restrict_self", "memfd_secret", "process_mrelease", "futex_waitv",
    "set_mempolicy_home_node", "cachestat", "fchmodat2", "map_shadow_stack", "futex_wake",
    "futex_wait", "futex_requeue", "statmount", "listmount", "lsm_get_self_attr",
    "lsm_set_self_attr", "lsm_list_modules", "mseal", "setxattrat", "getxattrat", "listxattrat",
    "removexattrat", "open_tree_attr", "file_getattr", "file_setattr")


def _bcc_table() -> dict[int, str]:
    """BCC's own table (``bcc.syscall``: ``ausyscall --dump`` when the audit tools are
    installed, else its built-in x86_64 table); it raises on other architectures without
    ausyscall."""
    try:
        from bcc.syscall import syscalls
    except Exception:  # noqa: BLE001 - bcc.syscall raises a bare Exception without ausyscall
        return {}
    return {int(nr): name.decode() if isinstance(name, bytes) else str(name)
            for nr, name in syscalls.items()}


def syscall_names() -> dict[int, str]:
    """Syscall number → name for the running architecture. One table that needs nothing else
    installed (the agent image has neither the audit tools nor /usr/include): BCC's, completed
    with the numbers all architectures share since Linux 5.1. Elsewhere (no BCC table) the
    architecture's ``asm/unistd*.h``. Unknown numbers are named ``syscall_<nr>`` by the caller."""
    out = _bcc_table()
    if not out:
        machine = os.uname().machine
        for p in (Path("/usr/include") / _UNISTD.get(machine, ""), Path("/usr/include/asm/unistd_64.h")):
            if p.is_file():
                try:
                    out = _from_header(p)
                except OSError:
                    continue
                if out:
                    break
    if out:
        for i, name in enumerate(_COMMON_SINCE_424):
            out.setdefault(424 + i, name)
    return out


def _sum_metric(name: str, description: str, points: Iterable[tuple[Mapping[str, Any], int]],
                start_ns: int, now_ns: int) -> Metric:
    m = Metric(name=name, description=description, unit="{call}" if name == "syscall.calls" else "{error}")
    m.sum.CopyFrom(Sum(aggregation_temporality=CUMULATIVE, is_monotonic=True))
    for attrs, value in points:
        m.sum.data_points.append(NumberDataPoint(attributes=to_key_values(attrs), as_int=int(value),
                                                 start_time_unix_nano=start_ns, time_unix_nano=now_ns))
    return m


def calls_metric(points: Iterable[tuple[Mapping[str, Any], int]], start_ns: int, now_ns: int) -> Metric:
    return _sum_metric("syscall.calls", "System calls completed", points, start_ns, now_ns)


def errors_metric(points: Iterable[tuple[Mapping[str, Any], int]], start_ns: int, now_ns: int) -> Metric:
    return _sum_metric("syscall.errors", "System calls that returned an error", points, start_ns, now_ns)


class HistPoint:
    """One series' cumulative histogram: log2 slot → count, plus count/sum/min/max (ns)."""

    __slots__ = ("slots", "count", "sum_ns", "min_ns", "max_ns")

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}
        self.count = 0
        self.sum_ns = 0
        self.min_ns = 0
        self.max_ns = 0


def duration_metric(points: Iterable[tuple[Mapping[str, Any], HistPoint]], start_ns: int,
                    now_ns: int) -> Metric:
    m = Metric(name="syscall.duration", description="System call duration", unit="ns")
    m.exponential_histogram.CopyFrom(ExponentialHistogram(aggregation_temporality=CUMULATIVE))
    for attrs, h in points:
        dp = ExponentialHistogramDataPoint(attributes=to_key_values(attrs), start_time_unix_nano=start_ns,
                                           time_unix_nano=now_ns, count=h.count, sum=float(h.sum_ns),
                                           scale=0, zero_count=h.slots.get(-1, 0))
        if h.count:
            dp.min = float(h.min_ns)
            dp.max = float(h.max_ns)
        slots = sorted(k for k, v in h.slots.items() if k >= 0 and v)
        if slots:
            lo, hi = slots[0], slots[-1]
            dp.positive.offset = lo
            dp.positive.bucket_counts.extend(h.slots.get(k, 0) for k in range(lo, hi + 1))
        m.exponential_histogram.data_points.append(dp)
    return m


def slow_call_span(name: str, nr: int, pid: int, tid: int, ret: int, start_unix_ns: int,
                   end_unix_ns: int) -> Span:
    attrs: dict[str, Any] = {"syscall.name": name, "syscall.nr": nr, "process.pid": pid,
                             "thread.id": tid, "syscall.return_value": ret}
    status = Status(code=Status.STATUS_CODE_UNSET)
    if ret < 0:
        attrs["error.type"] = errno_name(-ret)
        status = Status(code=Status.STATUS_CODE_ERROR, message=errno_name(-ret))
    return Span(trace_id=os.urandom(16), span_id=os.urandom(8), name=name, kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=start_unix_ns, end_time_unix_nano=end_unix_ns,
                attributes=to_key_values(attrs), status=status)


# ------------------------------------------------------------------ one call as an EbpfEvent
# (the library path: ``EbpfOtlpConverter.convert_event_to_span/metric`` of a SYSCALL event;
# attributes ``syscall.name``, ``syscall.nr``, ``syscall.return_value``)

def syscall_event_to_span(event: EbpfEvent) -> Span | None:
    a = event.attributes
    return slow_call_span(a.get("syscall.name", "syscall"), a.get("syscall.nr", -1), event.pid,
                          event.tid or event.pid, a.get("syscall.return_value", 0),
                          event.timestamp_unix_nano, event.end_unix_nano)


def syscall_event_to_metric(event: EbpfEvent) -> Metric | None:
    """One call's duration as a delta ``syscall.duration`` point (scale 0, as the aggregates)."""
    h = HistPoint()
    d = max(0, event.duration_ns)
    h.count, h.sum_ns, h.min_ns, h.max_ns = 1, d, d, d
    h.slots[d.bit_length() - 1] = 1          # -1 (the zero bucket) for a zero duration
    attrs = {"syscall.name": event.attributes.get("syscall.name", "syscall")}
    m = duration_metric([(attrs, h)], event.timestamp_unix_nano, event.end_unix_nano)
    m.exponential_histogram.aggregation_temporality = DELTA
    return m


register(EbpfEventType.SYSCALL, span=syscall_event_to_span, metric=syscall_event_to_metric)
