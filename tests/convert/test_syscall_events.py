"""The library path for system calls: an ``EbpfEvent`` of type SYSCALL through
``EbpfOtlpConverter``'s protobuf conversions (the sidecar's slow-call spans take the same rules)."""

from __future__ import annotations

from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from receiver import EbpfEvent, EbpfEventType, EbpfOtlpConverter

T0 = 1_700_000_000_000_000_000


def _event(ret: int = 0, duration_ns: int = 50_000_000) -> EbpfEvent:
    return EbpfEvent(EbpfEventType.SYSCALL, pid=42, tid=43, timestamp_unix_nano=T0,
                     duration_ns=duration_ns, comm="app",
                     attributes={"syscall.name": "nanosleep", "syscall.nr": 35,
                                 "syscall.return_value": ret})


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_syscall_event_to_span() -> None:
    span = EbpfOtlpConverter().span_proto(_event())
    assert span is not None
    assert span.name == "nanosleep" and span.kind == Span.SPAN_KIND_INTERNAL
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (T0, T0 + 50_000_000)
    assert _attrs(span.attributes) == {"syscall.name": "nanosleep", "syscall.nr": 35, "process.pid": 42,
                                       "thread.id": 43, "syscall.return_value": 0}
    assert span.status.code == Status.STATUS_CODE_UNSET


def test_failed_syscall_span_has_error_status() -> None:
    span = EbpfOtlpConverter().span_proto(_event(ret=-4))
    assert span is not None
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert _attrs(span.attributes)["error.type"] == "EINTR"


def test_syscall_event_to_metric_is_one_delta_observation() -> None:
    metric = EbpfOtlpConverter().metric_proto(_event())
    assert metric is not None and metric.name == "syscall.duration"
    h = metric.exponential_histogram
    assert h.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    (dp,) = h.data_points
    assert (dp.count, dp.sum, dp.min, dp.max, dp.scale) == (1, 50e6, 50e6, 50e6, 0)
    assert dp.positive.offset == 25 and list(dp.positive.bucket_counts) == [1]   # 2^25 ≤ 50e6 < 2^26


def test_unconfigured_signals_give_none() -> None:
    logs_only = EbpfOtlpConverter(signals=["logs"])
    assert logs_only.span_proto(_event()) is None
    assert logs_only.metric_proto(_event()) is None
    # Without a tracer or meter, the SDK path gives None, as the design document says.
    assert EbpfOtlpConverter().convert_event_to_span(_event()) is None
    assert EbpfOtlpConverter().convert_event_to_metric(_event()) is None
