"""What a conversion rule says about an event, before it is an OTLP message or an OpenTelemetry
SDK call: a ``SpanSpec`` (name, kind, times, attributes, error) and ``Measurement``s (instrument,
name, unit, value, attributes). The agent turns them into protobuf (``span_proto``,
``metric_proto``); the library hands them to the caller's tracer and meter (``start_sdk_span``,
``SdkInstruments``). One rule, two outputs: the same event becomes the same span either way.

``check_event`` turns every way an ``EbpfEvent`` can be malformed into one ``ConversionError``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

from ..errors import ConversionError
from ..model import EbpfEvent, EbpfEventType
from .attributes import to_key_values

__all__ = ["SpanSpec", "Measurement", "span_proto", "metric_proto", "check_event", "start_sdk_span",
           "SdkInstruments", "EventSpan"]

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
_rand = random.Random()
_U64 = 2**64
_I64 = 2**63
_PROTO_KIND = {"client": Span.SPAN_KIND_CLIENT, "server": Span.SPAN_KIND_SERVER,
               "internal": Span.SPAN_KIND_INTERNAL, "producer": Span.SPAN_KIND_PRODUCER,
               "consumer": Span.SPAN_KIND_CONSUMER}


@dataclass(slots=True)
class SpanSpec:
    name: str
    kind: str                       # client, server, internal, producer, consumer
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: str | None = None        # status message of an error; None: status unset


@dataclass(slots=True)
class Measurement:
    instrument: str                 # "counter" or "histogram"
    name: str
    unit: str
    description: str
    value: int | float
    attributes: dict[str, Any] = field(default_factory=dict)
    start_ns: int = 0               # the interval the value covers (a DELTA point)
    end_ns: int = 0


# ---------------------------------------------------------------------------- validation

def _check_value(key: str, value: Any) -> None:
    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -_I64 <= value < _I64:
            raise ConversionError(f"attribute {key!r}: {value} does not fit a 64-bit signed integer")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConversionError(f"attribute {key!r}: {value} is not a finite number")
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (list, tuple, dict)):
                raise ConversionError(f"attribute {key!r}: nested sequences are not attribute values")
            _check_value(key, v)
        return
    raise ConversionError(f"attribute {key!r}: {type(value).__name__} is not an attribute value "
                          "(str, bool, int, float or a list of them)")


def _check_uint(name: str, value: Any, bits: int = 64) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"{name}: expected an integer, got {type(value).__name__}")
    if not 0 <= value < 2**bits:
        raise ConversionError(f"{name}: {value} is out of range (0 to 2^{bits} - 1)")


def check_event(event: Any, required: Sequence[str] = ()) -> EbpfEvent:
    """The event, or a ``ConversionError`` saying what is wrong with it."""
    if not isinstance(event, EbpfEvent):
        raise ConversionError(f"expected an EbpfEvent, got {type(event).__name__}")
    if not isinstance(event.event_type, EbpfEventType):
        try:
            event.event_type = EbpfEventType(event.event_type)
        except ValueError:
            raise ConversionError(f"event_type: {event.event_type!r} is not an EbpfEventType") from None
    _check_uint("pid", event.pid, 32)
    _check_uint("tid", event.tid, 32)
    _check_uint("cgroup_id", event.cgroup_id)
    _check_uint("timestamp_unix_nano", event.timestamp_unix_nano)
    if isinstance(event.duration_ns, bool) or not isinstance(event.duration_ns, int):
        raise ConversionError(f"duration_ns: expected an integer, got {type(event.duration_ns).__name__}")
    if event.duration_ns < 0:
        raise ConversionError(f"duration_ns: {event.duration_ns}: the event ends before it starts")
    if event.end_unix_nano >= _U64:
        raise ConversionError("timestamp_unix_nano + duration_ns is past what OTLP times hold (2^64 ns)")
    if not isinstance(event.data, bytes):
        raise ConversionError(f"data: expected bytes, got {type(event.data).__name__}")
    if not isinstance(event.comm, str):
        raise ConversionError(f"comm: expected a string, got {type(event.comm).__name__}")
    if not isinstance(event.attributes, Mapping):
        raise ConversionError(f"attributes: expected a mapping, got {type(event.attributes).__name__}")
    for key, value in event.attributes.items():
        if not isinstance(key, str) or not key:
            raise ConversionError(f"attributes: keys are non-empty strings, got {key!r}")
        _check_value(key, value)
    missing = [k for k in required if k not in event.attributes]
    if missing:
        raise ConversionError(f"{event.event_type.name} events need the attributes {', '.join(missing)}")
    return event


# ---------------------------------------------------------------------------- protobuf

def span_proto(spec: SpanSpec) -> Span:
    status = (Status(code=Status.STATUS_CODE_ERROR, message=spec.error) if spec.error is not None
              else Status(code=Status.STATUS_CODE_UNSET))
    bits = _rand.getrandbits(192)   # one call for both ids: this runs per connection and slow call
    return Span(trace_id=(bits >> 64).to_bytes(16, "little"), span_id=(bits & (_U64 - 1)).to_bytes(8, "little"),
                name=spec.name, kind=_PROTO_KIND[spec.kind],
                start_time_unix_nano=spec.start_ns, end_time_unix_nano=spec.end_ns,
                attributes=to_key_values(spec.attributes), status=status)


def _histogram_point(m: Measurement) -> ExponentialHistogramDataPoint:
    """One observation at scale 0, in the bucket the kernel's log2 slot names (floor(log2 v)),
    as the agent's kernel-made histograms of the same metrics."""
    v = float(m.value)
    dp = ExponentialHistogramDataPoint(attributes=to_key_values(m.attributes), start_time_unix_nano=m.start_ns,
                                       time_unix_nano=m.end_ns, count=1, sum=v, min=v, max=v, scale=0)
    if v <= 0:
        dp.zero_count = 1
    else:
        dp.positive.offset = math.frexp(v)[1] - 1
        dp.positive.bucket_counts.append(1)
    return dp


def metric_proto(measurements: Sequence[Measurement]) -> Metric | None:
    """The measurements of one instrument as one DELTA metric (an event's contribution to the
    agent's cumulative metric of the same name)."""
    if not measurements:
        return None
    first = measurements[0]
    m = Metric(name=first.name, description=first.description, unit=first.unit)
    if first.instrument == "histogram":
        m.exponential_histogram.CopyFrom(ExponentialHistogram(aggregation_temporality=DELTA))
        m.exponential_histogram.data_points.extend(_histogram_point(x) for x in measurements)
    else:
        m.sum.CopyFrom(Sum(aggregation_temporality=DELTA, is_monotonic=True))
        for x in measurements:
            dp = NumberDataPoint(attributes=to_key_values(x.attributes), start_time_unix_nano=x.start_ns,
                                 time_unix_nano=x.end_ns)
            if isinstance(x.value, int):
                dp.as_int = x.value
            else:
                dp.as_double = x.value
            m.sum.data_points.append(dp)
    return m


# ---------------------------------------------------------------------------- OpenTelemetry SDK

class EventSpan:
    """A live span of the caller's tracer, started at the event's time. ``end()`` without a time
    ends it at the event's end (so it keeps the event's duration); everything else is the
    tracer's span (``set_attribute``, ``add_event``, ``set_status`` …)."""

    __slots__ = ("span", "event_end_ns")

    def __init__(self, span: Any, event_end_ns: int):
        self.span = span
        self.event_end_ns = event_end_ns

    def end(self, end_time: int | None = None) -> None:
        self.span.end(end_time=self.event_end_ns if end_time is None else end_time)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.span, name)

    def __enter__(self) -> EventSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def start_sdk_span(tracer: Any, spec: SpanSpec) -> EventSpan:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    kind = {"client": SpanKind.CLIENT, "server": SpanKind.SERVER, "internal": SpanKind.INTERNAL,
            "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}[spec.kind]
    span = tracer.start_span(spec.name, kind=kind, attributes=spec.attributes, start_time=spec.start_ns)
    if spec.error is not None:
        span.set_status(Status(StatusCode.ERROR, spec.error))
    return EventSpan(span, spec.end_ns)


class SdkInstruments:
    """The instruments of one meter, created once each (an SDK meter warns on duplicates)."""

    def __init__(self, meter: Any):
        self.meter = meter
        self._instruments: dict[tuple[str, str], Any] = {}

    def record(self, m: Measurement) -> None:
        key = (m.instrument, m.name)
        inst = self._instruments.get(key)
        if inst is None:
            create = self.meter.create_histogram if m.instrument == "histogram" else self.meter.create_counter
            inst = self._instruments[key] = create(m.name, unit=m.unit, description=m.description)
        if m.instrument == "histogram":
            inst.record(m.value, attributes=m.attributes)
        else:
            inst.add(m.value, attributes=m.attributes)
