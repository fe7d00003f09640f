"""The design document's complete example, in Python: an OpenTelemetry SDK TracerProvider with a
batch exporter, a converter with its tracer, the CPU profiler around a workload, and the profile
converted to OTLP and sent. Needs root (or CAP_BPF + CAP_PERFMON) for the profiler.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 python examples/ebpf_complete_example.py
"""

import os
import threading
import time

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import receiver
from receiver import EbpfConfig, EbpfCpuProfiler, EbpfEvent, EbpfEventType, EbpfOtlpConverter


def workload(seconds: float) -> int:
    """Busy work worth profiling."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        n += sum(i * i for i in range(1000))
    return n


def main() -> None:
    # 1. An OpenTelemetry tracer (the endpoint comes from OTEL_EXPORTER_OTLP_ENDPOINT).
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("ebpf-profiler")

    # 2. The converter, with that tracer.
    converter = EbpfOtlpConverter().with_tracer(tracer)

    # 3. The eBPF CPU profiler (EbpfConfig.default(): the production preset, 19 Hz).
    config = EbpfConfig.default()
    profiler = EbpfCpuProfiler(config)

    # 4. Start profiling.
    profiler.start()
    t0 = time.time_ns()

    # 5. The workload.
    workload(3.0)

    # 6. Stop, convert, and send.
    profile = profiler.stop()
    request = converter.convert_profile_to_otlp(profile)
    accepted = receiver.send(request, config)
    print(f"profile: {len(profile.sample)} stacks, {accepted} profile(s) (one per process) accepted by the Collector")

    # The workload as a span on the same tracer, from an event.
    event = EbpfEvent(EbpfEventType.CPU_SAMPLE, os.getpid(), threading.get_native_id(), b"",
                      timestamp_unix_nano=t0, duration_ns=time.time_ns() - t0,
                      attributes={"profile.sample.count": sum(s.value[0] for s in profile.sample)})
    span = converter.convert_event_to_span(event)
    span.set_attribute("example", "ebpf_complete_example")
    span.end()
    provider.shutdown()   # flushes the batch exporter


if __name__ == "__main__":
    main()
