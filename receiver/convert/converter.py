"""``EbpfOtlpConverter``: one place that turns events and profiles into OTLP messages.

Each ``convert_*`` returns ``None`` when its signal is not configured on this converter, or when
the event has no form in that signal, so callers can offer every event to every signal.
Per-event-type conversion functions live beside their source's data (``logs.py``, ``network.py``,
``syscalls.py``, ``profiles.py``) and are listed in the tables below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from ..model import EbpfEvent, EbpfEventType, Signal
from . import logs

__all__ = ["EbpfOtlpConverter"]

SPAN_CONVERTERS: dict[EbpfEventType, Callable[[EbpfEvent], Span | None]] = {}
METRIC_CONVERTERS: dict[EbpfEventType, Callable[[EbpfEvent], Metric | None]] = {}
LOG_CONVERTERS: dict[EbpfEventType, Callable[[EbpfEvent], LogRecord | None]] = {
    t: logs.process_event_to_log for t in logs.EVENT_NAMES
}


def register(event_type: EbpfEventType, *, span: Callable[[EbpfEvent], Span | None] | None = None,
             metric: Callable[[EbpfEvent], Metric | None] | None = None,
             log: Callable[[EbpfEvent], LogRecord | None] | None = None) -> None:
    """Adds a source's conversion functions for one event type."""
    if span:
        SPAN_CONVERTERS[event_type] = span
    if metric:
        METRIC_CONVERTERS[event_type] = metric
    if log:
        LOG_CONVERTERS[event_type] = log


class EbpfOtlpConverter:
    """Converts ``EbpfEvent``s and profiles to OTLP; ``signals`` says which are configured."""

    def __init__(self, signals: Iterable[Signal | str] = tuple(Signal)):
        self.signals = frozenset(Signal(s) for s in signals)

    def with_signals(self, *signals: Signal | str) -> "EbpfOtlpConverter":
        return EbpfOtlpConverter(self.signals | {Signal(s) for s in signals})

    def convert_event_to_span(self, event: EbpfEvent) -> Span | None:
        if Signal.TRACES not in self.signals:
            return None
        fn = SPAN_CONVERTERS.get(event.event_type)
        return fn(event) if fn else None

    def convert_event_to_metric(self, event: EbpfEvent) -> Metric | None:
        if Signal.METRICS not in self.signals:
            return None
        fn = METRIC_CONVERTERS.get(event.event_type)
        return fn(event) if fn else None

    def convert_event_to_log(self, event: EbpfEvent) -> LogRecord | None:
        if Signal.LOGS not in self.signals:
            return None
        fn = LOG_CONVERTERS.get(event.event_type)
        return fn(event) if fn else None

    def convert_profile_to_otlp(self, profile: Any) -> Any | None:
        """pprof ``Profile`` (or our ``CpuProfile``) → ``ExportProfilesServiceRequest``."""
        if Signal.PROFILES not in self.signals:
            return None
        from . import profiles  # the profiler's module; imported lazily (pprof protos)

        return profiles.profile_to_otlp(profile)


# Each source's conversion module registers its event types; import them here so the library
# API converts every event type without the sources being loaded.
from . import network, syscalls  # noqa: E402,F401
