"""``EbpfOtlpConverter``: the one set of conversion rules from ``EbpfEvent``s and profiles to OTLP,
used by the library and by the agent's pipeline alike.

Each ``convert_*`` returns ``None`` when its signal is not configured on this converter, or when
the event has no form in that signal, so callers can offer every event to every signal. The
per-event-type rules live beside their data (``logs.py``, ``network.py``, ``syscalls.py``,
``profiles.py``) and are listed in the tables below: what converts what is read here, not
registered as a side effect of an import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from ..model import EbpfEvent, EbpfEventType, Signal
from . import logs, network, syscalls

__all__ = ["EbpfOtlpConverter", "SPAN_RULES", "METRIC_RULES", "LOG_RULES"]

SPAN_RULES: dict[EbpfEventType, Callable[[EbpfEvent], Span | None]] = {
    EbpfEventType.NETWORK_CONNECTION: network.connection_span,
    EbpfEventType.NETWORK_CONNECTION_ACTIVE: network.connection_span,
    EbpfEventType.SYSCALL: syscalls.syscall_event_to_span,
}
METRIC_RULES: dict[EbpfEventType, Callable[[EbpfEvent], Metric | None]] = {
    EbpfEventType.NETWORK_CONNECTION: network.connection_io_metric,
    EbpfEventType.NETWORK_CONNECTION_ACTIVE: network.connection_io_metric,
    EbpfEventType.SYSCALL: syscalls.syscall_event_to_metric,
}
LOG_RULES: dict[EbpfEventType, Callable[[EbpfEvent], LogRecord | None]] = {
    t: logs.process_event_to_log for t in logs.EVENT_NAMES
}


class EbpfOtlpConverter:
    """Converts ``EbpfEvent``s and profiles to OTLP; ``signals`` says which are configured."""

    def __init__(self, signals: Iterable[Signal | str] = tuple(Signal)):
        self.signals = frozenset(Signal(s) for s in signals)

    def convert_event_to_span(self, event: EbpfEvent) -> Span | None:
        if Signal.TRACES not in self.signals:
            return None
        fn = SPAN_RULES.get(event.event_type)
        return fn(event) if fn else None

    def convert_event_to_metric(self, event: EbpfEvent) -> Metric | None:
        if Signal.METRICS not in self.signals:
            return None
        fn = METRIC_RULES.get(event.event_type)
        return fn(event) if fn else None

    def convert_event_to_log(self, event: EbpfEvent) -> LogRecord | None:
        if Signal.LOGS not in self.signals:
            return None
        fn = LOG_RULES.get(event.event_type)
        return fn(event) if fn else None

    def convert_profile_to_otlp(self, profile: Any) -> Any | None:
        """pprof ``Profile`` (or our ``CpuProfile``) → ``ExportProfilesServiceRequest``."""
        if Signal.PROFILES not in self.signals:
            return None
        from . import profiles  # pprof protos: loaded only when profiles are converted

        return profiles.profile_to_otlp(profile)
