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

from ..aggregates import OVERFLOW_KEY, ExpHistogram, Series, SeriesKey
from ..errors import ConversionError
from ..model import EbpfEvent, EbpfEventType
from ..records import ConnectionSnapshot, TcpConnection
from .attributes import to_key_values
from .spec import Measurement, SpanSpec

__all__ = ["OUTCOMES", "connection_event", "connection_span", "connection_io", "packet_span", "packet_io",
           "exp_histogram_point", "series_metrics", "snapshot_metrics"]

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
OUTCOMES = ("ok", "refused", "failed", "reset")

_KIND = {"client": "client", "server": "server"}
_NAME = {"client": "tcp connect", "server": "tcp accept"}


def connection_event(c: TcpConnection) -> EbpfEvent:
    """A connection record in semantic-convention terms: the one place these names are given."""
    direction = "client" if c.client else "server"
    attrs: dict[str, Any] = {
        "network.transport": "tcp", "network.type": c.network_type,
        "network.local.address": c.local_address, "network.local.port": c.local_port,
        "network.peer.address": c.peer_address, "network.peer.port": c.peer_port,
        "tcp.connection.direction": direction, "tcp.connection.outcome": c.outcome,
        "tcp.connection.sent_bytes": c.sent_bytes, "tcp.connection.received_bytes": c.received_bytes,
        "tcp.connection.retransmits": c.retransmits,
        "tcp.connection.resets_sent": c.resets_sent, "tcp.connection.resets_received": c.resets_received,
    }
    if c.client:
        attrs["server.address"], attrs["server.port"] = c.peer_address, c.peer_port
    else:
        attrs["server.address"], attrs["server.port"] = c.local_address, c.local_port
        attrs["client.address"], attrs["client.port"] = c.peer_address, c.peer_port
    kind = EbpfEventType.NETWORK_CONNECTION if c.finished else EbpfEventType.NETWORK_CONNECTION_ACTIVE
    return EbpfEvent(kind, pid=c.pid, timestamp_unix_nano=c.start_unix_nano, duration_ns=c.duration_ns,
                     comm=c.comm, attributes=attrs, cgroup_id=c.cgroup_id)


def connection_span(event: EbpfEvent) -> SpanSpec | None:
    """A finished connection as one span; a still-open one has no span yet (``None``)."""
    if event.event_type is not EbpfEventType.NETWORK_CONNECTION:
        return None
    a = event.attributes
    direction = a["tcp.connection.direction"]
    if direction not in _KIND:
        raise ConversionError(f"attribute 'tcp.connection.direction': 'client' or 'server', got {direction!r}")
    outcome = a.get("tcp.connection.outcome", "ok")
    attrs, error = a, None
    if outcome != "ok":
        attrs, error = {**a, "error.type": outcome}, f"connection {outcome}"
    return SpanSpec(_NAME[direction], _KIND[direction], event.timestamp_unix_nano, event.end_unix_nano,
                    attrs, error)   # no copy per connection: nothing downstream changes it


def connection_io(event: EbpfEvent) -> list[Measurement]:
    """One connection's bytes over [its start, the event]: its contribution to the agent's
    ``tcp.connection.io`` (same name, unit and attribute keys), so the points of a process's
    finished connections add up to the agent's cumulative value."""
    a = event.attributes
    base = {k: a[k] for k in ("network.transport", "network.type", "tcp.connection.direction",
                              "network.peer.address", "network.peer.port") if k in a}
    return [Measurement("counter", "tcp.connection.io", "By", _IO_DESCRIPTION, _non_negative(a, key, 0),
                        {**base, "network.io.direction": io_dir}, event.timestamp_unix_nano, event.end_unix_nano)
            for io_dir, key in (("transmit", "tcp.connection.sent_bytes"),
                                ("receive", "tcp.connection.received_bytes"))]


def packet_span(event: EbpfEvent) -> SpanSpec:
    """A packet (or a burst of them): an INTERNAL span named by its direction, with its
    ``network.*`` attributes."""
    a = event.attributes
    direction = a.get("network.io.direction", "transmit")
    attrs = {"network.io.direction": direction, "network.packet.size": len(event.data), **a,
             "process.pid": event.pid, "thread.id": event.tid or event.pid}
    return SpanSpec(f"network packet {direction}", "internal", event.timestamp_unix_nano, event.end_unix_nano,
                    attrs)


def packet_io(event: EbpfEvent) -> list[Measurement]:
    """The packet's bytes (``network.packet.size``, else the length of its data) on ``network.io``."""
    a = event.attributes
    size = _non_negative(a, "network.packet.size", len(event.data))
    attrs = {k: a[k] for k in ("network.transport", "network.type", "network.interface.name") if k in a}
    attrs["network.io.direction"] = a.get("network.io.direction", "transmit")
    return [Measurement("counter", "network.io", "By", "Network bytes sent and received", size, attrs,
                        event.timestamp_unix_nano, event.end_unix_nano)]


def _non_negative(a: dict[str, Any], key: str, default: int) -> int:
    v = a.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConversionError(f"attribute {key!r}: expected a count of bytes (an integer >= 0), got {v!r}")
    return v


_IO_DESCRIPTION = "TCP payload bytes sent and received"


def exp_histogram_point(h: ExpHistogram, attributes: dict[str, Any], start_ns: int,
                        now_ns: int) -> ExponentialHistogramDataPoint:
    dp = ExponentialHistogramDataPoint(attributes=to_key_values(attributes), start_time_unix_nano=start_ns,
                                       time_unix_nano=now_ns, count=h.count, sum=h.sum,
                                       scale=h.scale, zero_count=h.zero_count)
    if h.count:
        dp.min, dp.max = h.min, h.max
    if h.buckets:
        lo, hi = min(h.buckets), max(h.buckets)
        dp.positive.offset = lo
        dp.positive.bucket_counts.extend(h.buckets.get(i, 0) for i in range(lo, hi + 1))
    return dp


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
        exp_histogram_point(h, {**a, "tcp.connection.outcome": o}, start_ns, now_ns)
        for a, s in rows for o, h in s.duration.items())
    out = [
        _sum("tcp.connection.opened", "TCP connections opened (connect attempts and accepted)", "{connection}",
             True, ((a, s.opened) for a, s in rows), start_ns, now_ns),
        _sum("tcp.connection.closed", "TCP connections finished, by outcome", "{connection}", True,
             (({**a, "tcp.connection.outcome": o}, n) for a, s in rows for o, n in s.closed.items()),
             start_ns, now_ns),
        _sum("tcp.connection.active", "TCP connections open at the last report", "{connection}", False,
             ((a, s.active) for a, s in rows), start_ns, now_ns),
        _sum("tcp.connection.io", _IO_DESCRIPTION, "By", True,
             (p for a, s in rows for p in io(a, s.sent, s.received)), start_ns, now_ns),
        _sum("tcp.connection.retransmits", "TCP segments retransmitted", "{segment}", True,
             ((a, s.retransmits) for a, s in rows), start_ns, now_ns),
        _sum("tcp.connection.resets", "TCP resets sent and received", "{reset}", True,
             (p for a, s in rows for p in io(a, s.resets_sent, s.resets_received)), start_ns, now_ns),
    ]
    if hist.exponential_histogram.data_points:
        out.append(hist)
    return out


def snapshot_metrics(snapshot: ConnectionSnapshot) -> Iterator[tuple[int, list[Metric]]]:
    """(pid, metrics) for every process of a snapshot (pid 0: the overflow series)."""
    for pid, series in snapshot.by_pid.items():
        yield pid, series_metrics(series, snapshot.start_unix_nano, snapshot.time_unix_nano)
