"""CPU_SAMPLE events: on-CPU samples of one thread (``profile.sample.count`` of them, 1 when not
given), counted on ``process.cpu.samples``. A sample is an instant, so it has no span; whole
profiles go through ``convert_profile_to_otlp``."""

from __future__ import annotations

from ..errors import ConversionError
from ..model import EbpfEvent
from .spec import Measurement

__all__ = ["cpu_samples"]


def cpu_samples(event: EbpfEvent) -> list[Measurement]:
    n = event.attributes.get("profile.sample.count", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConversionError(f"attribute 'profile.sample.count': expected an integer >= 0, got {n!r}")
    attrs = {"process.pid": event.pid, "thread.id": event.tid or event.pid}
    name = event.attributes.get("process.executable.name") or event.comm
    if name:
        attrs["process.executable.name"] = name
    return [Measurement("counter", "process.cpu.samples", "{sample}", "On-CPU samples taken by the profiler",
                        n, attrs, event.timestamp_unix_nano, event.end_unix_nano)]
