"""System-call aggregates and slow calls → OTLP: cumulative ``syscall.calls`` / ``syscall.errors``
Sums, a ``syscall.duration`` ExponentialHistogram (scale 0), and slow-call Spans.

Histogram buckets come from the kernel's log2 slots: slot ``k`` counts durations in
``[2^k, 2^(k+1))`` ns. At scale 0 OTLP bucket index ``k`` covers ``(2^k, 2^(k+1)]``, so slot ``k`` is
put in bucket ``k``; the only difference is a duration of exactly a power of two, which lands one
bucket higher than OTLP would put it (a boundary approximation; count, sum, min and max are exact).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Metric,
    NumberDataPoint,
    Sum,
)

from ..aggregates import HistPoint
from ..errors import ConversionError
from ..kernel.syscall_table import errno_name
from ..model import EbpfEvent, EbpfEventType
from ..records import SlowSyscall, SyscallSnapshot
from .attributes import to_key_values
from .spec import Measurement, SpanSpec

__all__ = ["calls_metric", "errors_metric", "duration_metric", "slow_syscall_event", "syscall_span",
           "syscall_measurements", "snapshot_metrics"]

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

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


# ------------------------------------------------------------------ one call as an EbpfEvent
# (SYSCALL events: attributes ``syscall.name``, ``syscall.nr``, ``syscall.return_value``)

def syscall_span(event: EbpfEvent) -> SpanSpec:
    a = event.attributes
    name = str(a.get("syscall.name", "syscall"))
    ret = a.get("syscall.return_value", 0)
    if isinstance(ret, bool) or not isinstance(ret, int):
        raise ConversionError(f"attribute 'syscall.return_value': expected an integer, got {ret!r}")
    attrs: dict[str, Any] = {"syscall.name": name, "syscall.nr": a.get("syscall.nr", -1),
                             "process.pid": event.pid, "thread.id": event.tid or event.pid,
                             "syscall.return_value": ret}
    error = None
    if ret < 0:
        error = attrs["error.type"] = errno_name(-ret)
    return SpanSpec(name, "internal", event.timestamp_unix_nano, event.end_unix_nano, attrs, error)


def syscall_measurements(event: EbpfEvent) -> list[Measurement]:
    """One call's duration: its contribution to the agent's ``syscall.duration`` histogram."""
    return [Measurement("histogram", "syscall.duration", "ns", "System call duration", event.duration_ns,
                        {"syscall.name": str(event.attributes.get("syscall.name", "syscall"))},
                        event.timestamp_unix_nano, event.end_unix_nano)]


def slow_syscall_event(rec: SlowSyscall) -> EbpfEvent:
    """A slow-call record in semantic-convention terms."""
    return EbpfEvent(EbpfEventType.SYSCALL, rec.pid, rec.tid, timestamp_unix_nano=rec.start_unix_nano,
                     duration_ns=rec.duration_ns, comm=rec.comm,
                     attributes={"syscall.name": rec.name, "syscall.nr": rec.nr, "syscall.return_value": rec.ret})


def snapshot_metrics(snapshot: SyscallSnapshot) -> Iterator[tuple[int, list[Metric]]]:
    """(pid, metrics) for every process of a snapshot (pid 0: the whole host)."""
    start, now = snapshot.start_unix_nano, snapshot.time_unix_nano
    for pid in sorted(snapshot.by_pid):
        s = snapshot.by_pid[pid]
        out = []
        if s.calls:
            out.append(calls_metric((({"syscall.name": n}, c) for n, c in s.calls), start, now))
        if s.errors:
            out.append(errors_metric((({"syscall.name": n, "error.type": e}, c) for n, e, c in s.errors),
                                     start, now))
        if s.durations:
            out.append(duration_metric((({"syscall.name": n}, h) for n, h in s.durations), start, now))
        if out:
            yield pid, out
