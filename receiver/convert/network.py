"""TCP connections → OTLP: one Span per finished connection, and cumulative connection metrics
aggregated per owning process with a bounded number of attribute sets.

Span attributes (besides the semantic-convention ``network.*``, ``server.*``, ``client.*``):

- ``tcp.connection.outcome``: ``ok``; ``refused`` (a reset answered the SYN); ``failed`` (the
  connect never completed for another reason, e.g. a timeout); ``reset`` (a reset was sent or
  received after the connection was established). Anything but ``ok`` sets error status and
  ``error.type`` to the outcome.
- ``tcp.connection.sent_bytes`` / ``tcp.connection.received_bytes``: payload bytes the owning
  process wrote / read (send/receive system calls; MSG_PEEK reads not counted).
- ``tcp.connection.retransmits``: segments retransmitted by this side.
- ``tcp.connection.resets_sent`` / ``tcp.connection.resets_received``: RST segments.

Metrics (cumulative since the source started; ``tcp.connection.direction`` is ``client`` or
``server``): ``tcp.connection.opened``, ``tcp.connection.closed`` (+ outcome),
``tcp.connection.active`` (non-monotonic), ``tcp.connection.duration`` (exponential histogram,
seconds, + outcome), ``tcp.connection.io`` (bytes, ``network.io.direction``),
``tcp.connection.retransmits``, ``tcp.connection.resets`` (``network.io.direction``: transmit =
sent). ``network.peer.address``/``network.peer.port`` are added only with ``peer_attributes``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
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

__all__ = ["OUTCOMES", "connection_span", "connection_io_metric", "ExpHistogram",
           "ConnectionMetrics", "Series", "SeriesKey", "OVERFLOW_KEY"]

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
OUTCOMES = ("ok", "refused", "failed", "reset")

_KIND = {"client": Span.SPAN_KIND_CLIENT, "server": Span.SPAN_KIND_SERVER}
_NAME = {"client": "tcp connect", "server": "tcp accept"}
_OK = Status(code=Status.STATUS_CODE_UNSET)
_rand = random.Random()


def connection_span(event: EbpfEvent) -> Span | None:
    """A finished connection as one span; a still-open one has no span yet (``None``)."""
    if event.event_type is not EbpfEventType.NETWORK_CONNECTION:
        return None
    a = event.attributes
    direction = a["tcp.connection.direction"]
    outcome = a["tcp.connection.outcome"]
    if outcome == "ok":
        status = _OK
        attrs = a
    else:
        status = Status(code=Status.STATUS_CODE_ERROR, message=f"connection {outcome}")
        attrs = {**a, "error.type": outcome}
    bits = _rand.getrandbits(192)
    return Span(trace_id=(bits >> 64).to_bytes(16, "little"), span_id=(bits & ((1 << 64) - 1)).to_bytes(8, "little"),
                name=_NAME[direction], kind=_KIND[direction],
                start_time_unix_nano=event.timestamp_unix_nano, end_time_unix_nano=event.end_unix_nano,
                attributes=to_key_values(attrs), status=status)


def connection_io_metric(event: EbpfEvent) -> Metric:
    """One connection's byte counts so far (cumulative since it opened), for either event type."""
    a = event.attributes
    base = {k: a[k] for k in ("network.transport", "network.type", "tcp.connection.direction",
                              "network.peer.address", "network.peer.port") if k in a}
    m = Metric(name="tcp.connection.io", description="Payload bytes of one TCP connection", unit="By")
    m.sum.CopyFrom(Sum(aggregation_temporality=CUMULATIVE, is_monotonic=True))
    now = event.end_unix_nano
    for io_dir, key in (("transmit", "tcp.connection.sent_bytes"), ("receive", "tcp.connection.received_bytes")):
        m.sum.data_points.append(NumberDataPoint(
            attributes=to_key_values({**base, "network.io.direction": io_dir}), as_int=int(a.get(key, 0)),
            start_time_unix_nano=event.timestamp_unix_nano, time_unix_nano=now))
    return m


register(EbpfEventType.NETWORK_CONNECTION, span=connection_span, metric=connection_io_metric)
register(EbpfEventType.NETWORK_CONNECTION_ACTIVE, span=connection_span, metric=connection_io_metric)


# ------------------------------------------------------------------------------ exponential histogram

class ExpHistogram:
    """Base-2 exponential histogram of positive values, like the OpenTelemetry SDK's: starts at
    scale 20 and halves its resolution whenever more than ``max_size`` buckets would be needed."""

    __slots__ = ("scale", "buckets", "count", "sum", "min", "max", "zero_count", "max_size")

    def __init__(self, max_size: int = 160, scale: int = 20):
        self.scale = scale
        self.max_size = max_size
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0
        self.zero_count = 0

    def _index(self, value: float) -> int:
        # Bucket i covers (base^i, base^(i+1)] with base = 2^(2^-scale).
        return math.ceil(math.log2(value) * 2.0 ** self.scale) - 1

    def record(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if value <= 0:
            self.zero_count += 1
            return
        idx = self._index(value)
        if idx not in self.buckets and self.buckets:
            lo, hi = min(min(self.buckets), idx), max(max(self.buckets), idx)
            shift = 0
            while (hi >> shift) - (lo >> shift) + 1 > self.max_size:
                shift += 1
            if shift:
                merged: dict[int, int] = {}
                for i, n in self.buckets.items():
                    merged[i >> shift] = merged.get(i >> shift, 0) + n
                self.buckets = merged
                self.scale -= shift
                idx = self._index(value)
        self.buckets[idx] = self.buckets.get(idx, 0) + 1

    def data_point(self, attributes: dict[str, Any], start_ns: int, now_ns: int) -> ExponentialHistogramDataPoint:
        dp = ExponentialHistogramDataPoint(attributes=to_key_values(attributes), start_time_unix_nano=start_ns,
                                           time_unix_nano=now_ns, count=self.count, sum=self.sum,
                                           scale=self.scale, zero_count=self.zero_count)
        if self.count:
            dp.min, dp.max = self.min, self.max
        if self.buckets:
            lo, hi = min(self.buckets), max(self.buckets)
            dp.positive.offset = lo
            dp.positive.bucket_counts.extend(self.buckets.get(i, 0) for i in range(lo, hi + 1))
        return dp


# ------------------------------------------------------------------------------ aggregation

# (pid, direction, network.type, peer address or None, peer port or None)
SeriesKey = tuple[int, str, str, str | None, int | None]
OVERFLOW_KEY: SeriesKey = (0, "", "", None, None)


class Series:
    """Cumulative values of one attribute set of one process."""

    __slots__ = ("comm", "opened", "active", "closed", "duration", "sent", "received", "retransmits",
                 "resets_sent", "resets_received")

    def __init__(self, comm: str):
        self.comm = comm
        self.opened = 0
        self.active = 0
        self.closed: dict[str, int] = {}
        self.duration: dict[str, ExpHistogram] = {}
        self.sent = self.received = self.retransmits = self.resets_sent = self.resets_received = 0

    def add(self, sent: int, received: int, retransmits: int, resets_sent: int, resets_received: int) -> None:
        self.sent += sent
        self.received += received
        self.retransmits += retransmits
        self.resets_sent += resets_sent
        self.resets_received += resets_received


class ConnectionMetrics:
    """Per-process series of connection metrics, at most ``max_attribute_sets`` of them plus one
    overflow series (``otel.metric.overflow=true``) that takes everything beyond.

    Still-open connections are seen at each interval (``observe_active``); their counts so far are
    added then, and only the remainder when they finish, so the sums stay monotonic and exact."""

    def __init__(self, max_attribute_sets: int, peer_attributes: bool):
        self.max_attribute_sets = max_attribute_sets
        self.peer_attributes = peer_attributes
        self.series: dict[SeriesKey, Series] = {}
        # connection id → (series key, counts already added, scan generation when last seen)
        self._open: dict[tuple[int, int], tuple[SeriesKey, tuple[int, ...], int]] = {}
        self._generation = 0

    def key(self, pid: int, direction: str, net_type: str, peer_addr: str, peer_port: int) -> SeriesKey:
        if self.peer_attributes:
            return (pid, direction, net_type, peer_addr, peer_port)
        return (pid, direction, net_type, None, None)

    def _series(self, key: SeriesKey, comm: str) -> tuple[SeriesKey, Series]:
        s = self.series.get(key)
        if s is None:
            if len(self.series) >= self.max_attribute_sets + (OVERFLOW_KEY in self.series):
                key = OVERFLOW_KEY
                s = self.series.get(key)
                if s is None:
                    s = self.series[key] = Series("")
            else:
                s = self.series[key] = Series(comm)
        return key, s

    def begin_scan(self) -> None:
        """Starts a pass over the still-open connections: their ``active`` counts restart."""
        self._generation += 1
        for s in self.series.values():
            s.active = 0

    def observe_active(self, conn_id: tuple[int, int], key: SeriesKey, comm: str, counts: tuple[int, ...]) -> None:
        prev = self._open.get(conn_id)
        if prev is None:
            key, s = self._series(key, comm)
            s.opened += 1
            before: tuple[int, ...] = (0, 0, 0, 0, 0)
        else:
            key, before = prev[0], prev[1]
            s = self.series[key]
        s.active += 1
        s.add(*(now - was for now, was in zip(counts, before)))
        self._open[conn_id] = (key, counts, self._generation)

    def end_scan(self) -> None:
        """Forgets open connections not seen in the last two scans (their end record was lost)."""
        stale = [c for c, (_k, _n, g) in self._open.items() if g < self._generation - 1]
        for c in stale:
            del self._open[c]

    def observe_finished(self, conn_id: tuple[int, int], key: SeriesKey, comm: str, counts: tuple[int, ...],
                         outcome: str, duration_s: float) -> None:
        prev = self._open.pop(conn_id, None)
        if prev is None:
            key, s = self._series(key, comm)
            s.opened += 1
            s.add(*counts)
        else:
            key = prev[0]
            s = self.series[key]
            s.add(*(now - was for now, was in zip(counts, prev[1])))
        s.closed[outcome] = s.closed.get(outcome, 0) + 1
        h = s.duration.get(outcome)
        if h is None:
            h = s.duration[outcome] = ExpHistogram()
        h.record(duration_s)

    def forget_pids(self, pids: set[int]) -> None:
        """Drops the series of finished processes (after their final values went out)."""
        open_keys = {k for k, _n, _g in self._open.values()}
        for key in [k for k in self.series if k[0] in pids and k not in open_keys]:
            del self.series[key]

    def by_pid(self) -> dict[int, list[tuple[SeriesKey, Series]]]:
        out: dict[int, list[tuple[SeriesKey, Series]]] = {}
        for key, s in self.series.items():
            out.setdefault(key[0], []).append((key, s))
        return out


def _attributes(key: SeriesKey) -> dict[str, Any]:
    if key == OVERFLOW_KEY:
        return {"otel.metric.overflow": True}
    _pid, direction, net_type, peer_addr, peer_port = key
    attrs: dict[str, Any] = {"network.transport": "tcp", "network.type": net_type,
                             "tcp.connection.direction": direction}
    if peer_addr is not None:
        attrs["network.peer.address"] = peer_addr
        attrs["network.peer.port"] = peer_port
    return attrs


def _sum(name: str, description: str, unit: str, monotonic: bool,
         points: Iterator[tuple[dict[str, Any], int]], start_ns: int, now_ns: int) -> Metric:
    m = Metric(name=name, description=description, unit=unit)
    m.sum.CopyFrom(Sum(aggregation_temporality=CUMULATIVE, is_monotonic=monotonic))
    m.sum.data_points.extend(NumberDataPoint(attributes=to_key_values(a), as_int=v, start_time_unix_nano=start_ns,
                                             time_unix_nano=now_ns) for a, v in points)
    return m


def series_metrics(series: list[tuple[SeriesKey, Series]], start_ns: int, now_ns: int) -> list[Metric]:
    """The metrics of one process's series."""
    rows = [(_attributes(k), s) for k, s in series]

    def io(a: dict[str, Any], tx: int, rx: int) -> Iterator[tuple[dict[str, Any], int]]:
        yield {**a, "network.io.direction": "transmit"}, tx
        yield {**a, "network.io.direction": "receive"}, rx

    hist = Metric(name="tcp.connection.duration", description="Duration of finished TCP connections", unit="s")
    hist.exponential_histogram.CopyFrom(ExponentialHistogram(aggregation_temporality=CUMULATIVE))
    hist.exponential_histogram.data_points.extend(
        h.data_point({**a, "tcp.connection.outcome": o}, start_ns, now_ns)
        for a, s in rows for o, h in s.duration.items())
    out = [
        _sum("tcp.connection.opened", "TCP connections opened (connect attempts and accepted)", "{connection}",
             True, ((a, s.opened) for a, s in rows), start_ns, now_ns),
        _sum("tcp.connection.closed", "TCP connections finished, by outcome", "{connection}", True,
             (({**a, "tcp.connection.outcome": o}, n) for a, s in rows for o, n in s.closed.items()),
             start_ns, now_ns),
        _sum("tcp.connection.active", "TCP connections open at the last report", "{connection}", False,
             ((a, s.active) for a, s in rows), start_ns, now_ns),
        _sum("tcp.connection.io", "TCP payload bytes sent and received", "By", True,
             (p for a, s in rows for p in io(a, s.sent, s.received)), start_ns, now_ns),
        _sum("tcp.connection.retransmits", "TCP segments retransmitted", "{segment}", True,
             ((a, s.retransmits) for a, s in rows), start_ns, now_ns),
        _sum("tcp.connection.resets", "TCP resets sent and received", "{reset}", True,
             (p for a, s in rows for p in io(a, s.resets_sent, s.resets_received)), start_ns, now_ns),
    ]
    if hist.exponential_histogram.data_points:
        out.append(hist)
    return out
