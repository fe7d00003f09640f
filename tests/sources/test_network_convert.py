"""Network conversion without BPF: the converter's span/metric functions for connection events,
the exponential histogram, and the bounded, exact connection metrics."""

from __future__ import annotations

import math

from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from receiver import aggregates as agg
from receiver.convert import network as conv
from receiver.convert.converter import EbpfOtlpConverter
from receiver.model import EbpfEvent, EbpfEventType, Signal


def _event(event_type: EbpfEventType, outcome: str = "ok", direction: str = "client") -> EbpfEvent:
    attrs = {"network.transport": "tcp", "network.type": "ipv4", "network.local.address": "127.0.0.1",
             "network.local.port": 40000, "network.peer.address": "127.0.0.1", "network.peer.port": 8080,
             "server.address": "127.0.0.1", "server.port": 8080, "tcp.connection.direction": direction,
             "tcp.connection.outcome": outcome, "tcp.connection.sent_bytes": 10,
             "tcp.connection.received_bytes": 20, "tcp.connection.retransmits": 0,
             "tcp.connection.resets_sent": 0, "tcp.connection.resets_received": 0}
    return EbpfEvent(event_type, pid=42, timestamp_unix_nano=1_000, duration_ns=500, comm="curl", attributes=attrs)


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


def test_converter_spans_for_finished_connections_only() -> None:
    conv_ = EbpfOtlpConverter()
    span = conv_.span_proto(_event(EbpfEventType.NETWORK_CONNECTION))
    assert span is not None and span.kind == Span.SPAN_KIND_CLIENT
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (1_000, 1_500)
    a = _attrs(span.attributes)
    assert a["server.port"] == 8080 and a["tcp.connection.sent_bytes"] == 10 and "error.type" not in a
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert len(span.trace_id) == 16 and len(span.span_id) == 8

    refused = conv_.span_proto(_event(EbpfEventType.NETWORK_CONNECTION, "refused"))
    assert refused is not None and refused.status.code == Status.STATUS_CODE_ERROR
    assert _attrs(refused.attributes)["error.type"] == "refused"
    server = conv_.span_proto(_event(EbpfEventType.NETWORK_CONNECTION, direction="server"))
    assert server is not None and server.kind == Span.SPAN_KIND_SERVER
    assert conv_.span_proto(_event(EbpfEventType.NETWORK_CONNECTION_ACTIVE)) is None
    assert EbpfOtlpConverter(signals=[Signal.METRICS]).span_proto(_event(EbpfEventType.NETWORK_CONNECTION)) is None


def test_converter_metric_is_the_connections_bytes() -> None:
    for t in (EbpfEventType.NETWORK_CONNECTION, EbpfEventType.NETWORK_CONNECTION_ACTIVE):
        m = EbpfOtlpConverter().metric_proto(_event(t))
        assert m is not None and m.name == "tcp.connection.io" and m.sum.is_monotonic
        values = {_attrs(dp.attributes)["network.io.direction"]: dp.as_int for dp in m.sum.data_points}
        assert values == {"transmit": 10, "receive": 20}


def test_exponential_histogram_buckets_hold_their_values() -> None:
    h = agg.ExpHistogram(max_size=20)
    values = [0.0, 1e-6, 3e-5, 0.001, 0.0123, 0.5, 1.0, 2.0, 7.5, 300.0]
    for v in values:
        h.record(v)
    dp = conv.exp_histogram_point(h, {}, 0, 1)
    assert dp.count == len(values) and math.isclose(dp.sum, sum(values)) and dp.zero_count == 1
    assert len(dp.positive.bucket_counts) <= 20 and sum(dp.positive.bucket_counts) == len(values) - 1
    base = 2.0 ** (2.0 ** -dp.scale)
    for v in values[1:]:   # each value lies in (base^i, base^(i+1)] of a non-empty bucket i
        assert any(n and base ** (dp.positive.offset + i) < v * (1 + 1e-9)
                   and v <= base ** (dp.positive.offset + i + 1) * (1 + 1e-9)
                   for i, n in enumerate(dp.positive.bucket_counts)), v
    assert dp.min == 0.0 and dp.max == 300.0


def test_metrics_overflow_and_open_connections_counted_once() -> None:
    m = agg.ConnectionMetrics(max_attribute_sets=2, peer_attributes=True)
    for i in range(5):
        key = m.key(7, "client", "ipv4", f"10.0.0.{i}", 80)
        m.observe_finished((i, 1), key, "curl", (100, 200, 1, 0, 0), "ok", 0.01)
    assert len(m.series) == 3 and agg.OVERFLOW_KEY in m.series
    assert m.series[agg.OVERFLOW_KEY].opened == 3 and m.series[agg.OVERFLOW_KEY].sent == 300
    metrics = {x.name: x for x in conv.series_metrics(list(m.series.items()), 0, 1)}
    overflow = [dp for dp in metrics["tcp.connection.opened"].sum.data_points
                if _attrs(dp.attributes) == {"otel.metric.overflow": True}]
    assert len(overflow) == 1 and overflow[0].as_int == 3

    m = agg.ConnectionMetrics(max_attribute_sets=10, peer_attributes=False)
    key = m.key(7, "server", "ipv6", "::1", 5555)
    assert key == (7, "server", "ipv6", None, None)
    for sent in (10, 30):   # seen open at two intervals
        m.begin_scan()
        m.observe_active((1, 1), key, "srv", (sent, 5, 0, 0, 0))
        m.end_scan()
    s = m.series[key]
    assert (s.opened, s.active, s.sent) == (1, 1, 30)
    m.observe_finished((1, 1), key, "srv", (45, 5, 0, 0, 1), "reset", 2.0)
    m.begin_scan()
    m.end_scan()
    assert (s.opened, s.active, s.sent, s.received, s.resets_received) == (1, 0, 45, 5, 1)
    assert s.closed == {"reset": 1} and s.duration["reset"].count == 1
