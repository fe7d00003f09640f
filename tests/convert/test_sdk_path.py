"""The library as the design document uses it: ``with_tracer``/``with_meter`` with the
OpenTelemetry SDK, live spans the caller extends and ends, metrics recorded into instruments,
``EbpfEvent`` in the document's positional order, and one typed ``ConversionError``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from receiver import ConversionError, EbpfEvent, EbpfEventType, EbpfOtlpConverter

from ..harness import examples

T0 = 1_700_000_000_000_000_000


@pytest.fixture
def tracing() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


@pytest.fixture
def metering() -> Any:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider.get_meter("test"), reader
    provider.shutdown()


def _connection(outcome: str = "ok") -> EbpfEvent:
    return EbpfEvent(EbpfEventType.NETWORK_CONNECTION, 1234, 5678, timestamp_unix_nano=T0, duration_ns=2_000_000,
                     attributes={"tcp.connection.direction": "client", "tcp.connection.outcome": outcome,
                                 "network.transport": "tcp", "network.type": "ipv4",
                                 "network.peer.address": "10.0.0.1", "network.peer.port": 443,
                                 "tcp.connection.sent_bytes": 10, "tcp.connection.received_bytes": 20})


def test_span_is_live_on_the_callers_tracer_and_keeps_the_event_duration(tracing: Any) -> None:
    tracer, exported = tracing
    converter = EbpfOtlpConverter().with_tracer(tracer)
    span = converter.convert_event_to_span(_connection())
    assert span is not None and span.is_recording()
    span.set_attribute("network.protocol.name", "tls")   # the document's "set more attributes"
    span.end()
    (done,) = exported.get_finished_spans()
    assert (done.name, done.kind) == ("tcp connect", SpanKind.CLIENT)
    assert (done.start_time, done.end_time) == (T0, T0 + 2_000_000)
    assert done.attributes["network.protocol.name"] == "tls"
    assert done.attributes["network.peer.port"] == 443
    assert done.status.status_code == StatusCode.UNSET


def test_explicit_end_time_and_error_status(tracing: Any) -> None:
    tracer, exported = tracing
    span = EbpfOtlpConverter(tracer).convert_event_to_span(_connection("refused"))   # positional too
    span.end(end_time=T0 + 5)
    (done,) = exported.get_finished_spans()
    assert done.end_time == T0 + 5
    assert done.status.status_code == StatusCode.ERROR and done.attributes["error.type"] == "refused"


def test_one_span_either_way(tracing: Any) -> None:
    """The SDK path and the protobuf path apply the same rule."""
    tracer, exported = tracing
    converter = EbpfOtlpConverter().with_tracer(tracer)
    converter.convert_event_to_span(_connection("reset")).end()
    (sdk,) = exported.get_finished_spans()
    proto = converter.span_proto(_connection("reset"))
    proto_attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in proto.attributes}
    assert (sdk.name, sdk.start_time, sdk.end_time) == (proto.name, proto.start_time_unix_nano,
                                                         proto.end_time_unix_nano)
    assert dict(sdk.attributes) == proto_attrs
    assert sdk.status.description == proto.status.message


def test_metrics_are_recorded_into_instruments_made_once(metering: Any) -> None:
    meter, reader = metering
    converter = EbpfOtlpConverter().with_meter(meter)
    for d in (1_000, 2_000, 4_000_000):
        converter.convert_event_to_metric(EbpfEvent(EbpfEventType.SYSCALL, 1, 2, duration_ns=d,
                                                    attributes={"syscall.name": "read"}))
    for _ in range(3):
        converter.convert_event_to_metric(_connection())
    metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics}
    (hp,) = metrics["syscall.duration"].data.data_points
    assert (hp.count, hp.sum, hp.max) == (3, 4_003_000, 4_000_000)
    io = {dp.attributes["network.io.direction"]: dp.value for dp in metrics["tcp.connection.io"].data.data_points}
    assert io == {"transmit": 30, "receive": 60}
    assert len(converter._instruments._instruments) == 2


def test_document_positional_order_and_every_event_type(tracing: Any, metering: Any) -> None:
    tracer, _ = tracing
    meter, reader = metering
    converter = EbpfOtlpConverter().with_tracer(tracer).with_meter(meter)
    packet = EbpfEvent(EbpfEventType.NETWORK_PACKET, 1234, 5678, [])     # EbpfEvent::new(.., vec![])
    assert packet.data == b"" and packet.timestamp_unix_nano > 0
    span = converter.convert_event_to_span(packet)
    assert span is not None
    span.end()
    sample = EbpfEvent(EbpfEventType.CPU_SAMPLE, 1234, 5678, b"", attributes={"profile.sample.count": 3})
    sample_span = converter.convert_event_to_span(sample)
    assert sample_span is not None and sample_span.attributes["profile.sample.count"] == 3
    sample_span.end()
    assert [m.value for m in converter.convert_event_to_metric(sample)] == [3]
    assert converter.convert_event_to_metric(EbpfEvent(EbpfEventType.NETWORK_PACKET, 1, 1, b"x" * 100))[0].value == 100
    names = {m.name for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"process.cpu.samples", "network.io"} <= names


@pytest.mark.parametrize(("event", "message"), [
    (EbpfEvent(EbpfEventType.NETWORK_CONNECTION, 1, 1), "need the attributes tcp.connection.direction"),
    (EbpfEvent(EbpfEventType.SYSCALL, 1, 1, attributes={"syscall.nr": 2**64}), "does not fit a 64-bit"),
    (EbpfEvent(EbpfEventType.SYSCALL, 2**40, 1), "pid: 1099511627776 is out of range"),
    (EbpfEvent(EbpfEventType.SYSCALL, 1, 1, duration_ns=-5), "ends before it starts"),
    (EbpfEvent(EbpfEventType.SYSCALL, "1", 1), "pid: expected an integer"),                  # type: ignore[arg-type]
    (EbpfEvent(EbpfEventType.NETWORK_PACKET, 1, 1, 42), "data: expected bytes"),             # type: ignore[arg-type]
    (EbpfEvent("no.such.type", 1, 1), "is not an EbpfEventType"),                            # type: ignore[arg-type]
])
def test_malformed_events_raise_one_typed_error(event: EbpfEvent, message: str) -> None:
    for convert in (EbpfOtlpConverter().span_proto, EbpfOtlpConverter().metric_proto):
        with pytest.raises(ConversionError, match=message):
            convert(event)


@pytest.mark.parametrize(("event", "message"), [   # values only the span rule reads
    (EbpfEvent(EbpfEventType.SYSCALL, 1, 1, attributes={"syscall.return_value": "x"}), "syscall.return_value"),
    (EbpfEvent(EbpfEventType.NETWORK_CONNECTION, 1, 1, attributes={"tcp.connection.direction": "up"}),
     "'client' or 'server'"),
])
def test_malformed_span_values_raise_one_typed_error(event: EbpfEvent, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        EbpfOtlpConverter().span_proto(event)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=examples(400), deadline=None)
@given(event_type=st.one_of(st.sampled_from(list(EbpfEventType)), st.text(max_size=12)),
       pid=_VALUES, tid=_VALUES, data=_VALUES, ts=_VALUES, duration=_VALUES, comm=_VALUES,
       attributes=st.one_of(_VALUES, st.dictionaries(
           st.one_of(st.sampled_from(["tcp.connection.direction", "tcp.connection.outcome", "syscall.name",
                                      "syscall.return_value", "tcp.connection.sent_bytes", "network.packet.size",
                                      "profile.sample.count", "process.exit.code"]), st.text(max_size=6)),
           _VALUES, max_size=5)))
def test_any_event_converts_or_raises_conversion_error(**fields: Any) -> None:
    """Fuzzed: a valid message or ``ConversionError``, never another exception."""
    event = EbpfEvent(fields["event_type"], fields["pid"], fields["tid"], fields["data"],
                      timestamp_unix_nano=fields["ts"], duration_ns=fields["duration"], comm=fields["comm"],
                      attributes=fields["attributes"])
    converter = EbpfOtlpConverter()
    for convert in (converter.span_proto, converter.metric_proto, converter.log_proto):
        try:
            message = convert(event)
        except ConversionError:
            continue
        if message is not None:
            message.SerializeToString()   # a valid protobuf message
