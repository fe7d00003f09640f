"""CPU_SAMPLE events: on-CPU samples of one thread (``profile.sample.count`` of them, 1 when not
given): a ``cpu sample`` span over the time they stand for (``duration_ns``), and a count on
``process.cpu.samples``. Whole profiles go through ``convert_profile_to_otlp``."""

from __future__ import annotations

from ..errors import ConversionError
from ..model import EbpfEvent
from .spec import Measurement, SpanSpec

__all__ = ["cpu_samples", "cpu_sample_span"]


def _count(event: EbpfEvent) -> int:
    n = event.attributes.get("profile.sample.count", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConversionError(f"attribute 'profile.sample.count': expected an integer >= 0, got {n!r}")
    return n


def _thread(event: EbpfEvent) -> dict[str, object]:
    attrs: dict[str, object] = {"process.pid": event.pid, "thread.id": event.tid or event.pid}
    name = event.attributes.get("process.executable.name") or event.comm
    if name:
        attrs["process.executable.name"] = name
    return attrs


def cpu_sample_span(event: EbpfEvent) -> SpanSpec:
    attrs = {**event.attributes, **_thread(event), "profile.sample.count": _count(event)}
    return SpanSpec("cpu sample", "internal", event.timestamp_unix_nano, event.end_unix_nano, attrs)


def cpu_samples(event: EbpfEvent) -> list[Measurement]:
    n = _count(event)
    attrs = _thread(event)
    return [Measurement("counter", "process.cpu.samples", "{sample}", "On-CPU samples taken by the profiler",
                        n, attrs, event.timestamp_unix_nano, event.end_unix_nano)]
