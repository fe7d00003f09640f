"""``EbpfOtlpConverter``: the one set of conversion rules from ``EbpfEvent``s and profiles to
OpenTelemetry, used by the library and by the agent's pipeline alike.

As the design document has it: ``EbpfOtlpConverter().with_tracer(tracer)`` makes
``convert_event_to_span`` start a live span on the caller's tracer (the caller may add to it and
``end()`` it); ``with_meter(meter)`` makes ``convert_event_to_metric`` record into that meter's
instruments. Without a tracer or meter they return ``None``. The ``*_proto`` methods give the
same conversions as OTLP protobuf messages (what the agent sends, measured faster than the SDK).
A malformed event raises ``ConversionError``, never a bare KeyError/ValueError/TypeError.

What converts what is read in the tables below, not registered as a side effect of an import.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from ..errors import ConversionError
from ..model import EbpfEvent, EbpfEventType, Signal
from . import logs, network, samples, syscalls
from .spec import Measurement, SdkInstruments, SpanSpec, check_event, metric_proto, span_proto, start_sdk_span

__all__ = ["EbpfOtlpConverter", "SPAN_RULES", "METRIC_RULES", "LOG_RULES", "REQUIRED"]

SPAN_RULES: dict[EbpfEventType, Callable[[EbpfEvent], SpanSpec | None]] = {
    EbpfEventType.NETWORK_CONNECTION: network.connection_span,
    EbpfEventType.NETWORK_CONNECTION_ACTIVE: network.connection_span,   # None: not finished yet
    EbpfEventType.NETWORK_PACKET: network.packet_span,
    EbpfEventType.SYSCALL: syscalls.syscall_span,
    EbpfEventType.CPU_SAMPLE: samples.cpu_sample_span,
}
METRIC_RULES: dict[EbpfEventType, Callable[[EbpfEvent], list[Measurement]]] = {
    EbpfEventType.NETWORK_CONNECTION: network.connection_io,
    EbpfEventType.NETWORK_CONNECTION_ACTIVE: network.connection_io,
    EbpfEventType.NETWORK_PACKET: network.packet_io,
    EbpfEventType.SYSCALL: syscalls.syscall_measurements,
    EbpfEventType.CPU_SAMPLE: samples.cpu_samples,
}
LOG_RULES: dict[EbpfEventType, Callable[[EbpfEvent], LogRecord | None]] = {
    t: logs.process_event_to_log for t in logs.EVENT_NAMES
}
# Attributes without which an event type has no meaning.
REQUIRED: dict[EbpfEventType, tuple[str, ...]] = {
    EbpfEventType.NETWORK_CONNECTION: ("tcp.connection.direction",),
    EbpfEventType.NETWORK_CONNECTION_ACTIVE: ("tcp.connection.direction",),
}


def _type_of(event: Any) -> Any:
    t = getattr(event, "event_type", None)
    try:
        return EbpfEventType(t)
    except ValueError:
        return t   # check_event names the problem


def _no_span(event: EbpfEvent) -> None:
    return None


def _no_measurements(event: EbpfEvent) -> list[Measurement]:
    return []


def _no_log(event: EbpfEvent) -> None:
    return None


def _apply(rule: Callable[[EbpfEvent], Any], event: Any) -> Any:
    """The rule's result for a checked event (every event is checked, even one whose type has
    no form in the signal)."""
    event = check_event(event, REQUIRED.get(_type_of(event), ()))
    try:
        return rule(event)
    except ConversionError:
        raise
    except (KeyError, ValueError, TypeError, OverflowError, AttributeError) as e:
        raise ConversionError(f"{event.event_type.name} event: {type(e).__name__}: {e}") from e


class EbpfOtlpConverter:
    """Converts ``EbpfEvent``s and profiles. ``signals`` limits the protobuf conversions to the
    signals configured (the others return ``None``)."""

    def __init__(self, tracer: Any = None, meter: Any = None, *,
                 signals: Iterable[Signal | str] = tuple(Signal)):
        self.tracer = tracer
        self.meter = meter
        self._instruments = SdkInstruments(meter) if meter is not None else None
        self.signals = frozenset(Signal(s) for s in signals)

    def with_tracer(self, tracer: Any) -> EbpfOtlpConverter:
        """A converter whose ``convert_event_to_span`` starts spans on ``tracer`` (an
        OpenTelemetry API ``Tracer``, e.g. ``TracerProvider().get_tracer(...)``)."""
        if not callable(getattr(tracer, "start_span", None)):
            raise TypeError(f"with_tracer takes an OpenTelemetry Tracer, got {type(tracer).__name__}")
        other = copy.copy(self)
        other.tracer = tracer
        return other

    def with_meter(self, meter: Any) -> EbpfOtlpConverter:
        """A converter whose ``convert_event_to_metric`` records into ``meter``'s instruments
        (created once each)."""
        if not callable(getattr(meter, "create_counter", None)):
            raise TypeError(f"with_meter takes an OpenTelemetry Meter, got {type(meter).__name__}")
        other = copy.copy(self)
        other.meter = meter
        other._instruments = SdkInstruments(meter)
        return other

    # ------------------------------------------------------------------ OpenTelemetry SDK

    def convert_event_to_span(self, event: EbpfEvent) -> Any | None:
        """A live span on the tracer, started at the event's time with its attributes, kind and
        status; ``end()`` without a time keeps the event's duration. ``None`` without a tracer,
        or for an event type with no span."""
        if self.tracer is None:
            return None
        spec = _apply(SPAN_RULES.get(_type_of(event), _no_span), event)
        return start_sdk_span(self.tracer, spec) if spec is not None else None

    def convert_event_to_metric(self, event: EbpfEvent) -> list[Measurement] | None:
        """Records the event into the meter's instruments and returns what was recorded;
        ``None`` without a meter."""
        if self._instruments is None:
            return None
        measurements = _apply(METRIC_RULES.get(_type_of(event), _no_measurements), event)
        for m in measurements:
            self._instruments.record(m)
        return measurements

    # ------------------------------------------------------------------ OTLP protobuf

    def span_proto(self, event: EbpfEvent) -> Span | None:
        if Signal.TRACES not in self.signals:
            return None
        spec = _apply(SPAN_RULES.get(_type_of(event), _no_span), event)
        return span_proto(spec) if spec is not None else None

    def metric_proto(self, event: EbpfEvent) -> Metric | None:
        if Signal.METRICS not in self.signals:
            return None
        return metric_proto(_apply(METRIC_RULES.get(_type_of(event), _no_measurements), event))

    def log_proto(self, event: EbpfEvent) -> LogRecord | None:
        if Signal.LOGS not in self.signals:
            return None
        return _apply(LOG_RULES.get(_type_of(event), _no_log), event)

    def convert_profile_to_otlp(self, profile: Any) -> Any | None:
        """pprof ``Profile`` (or our ``CpuProfile``) → ``ExportProfilesServiceRequest``."""
        if Signal.PROFILES not in self.signals:
            return None
        from . import profiles  # pprof protos: loaded only when profiles are converted

        return profiles.profile_to_otlp(profile)
