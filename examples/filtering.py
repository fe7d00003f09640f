"""Filtering: only the events that matter are converted (here: CPU samples), the rest skipped.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 python examples/filtering.py
"""

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from receiver import EbpfEvent, EbpfEventType, EbpfOtlpConverter

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
converter = EbpfOtlpConverter().with_tracer(provider.get_tracer("ebpf-example"))

events = [
    EbpfEvent(EbpfEventType.CPU_SAMPLE, 1234, 5678, b"", duration_ns=10_101_010),
    EbpfEvent(EbpfEventType.NETWORK_PACKET, 1234, 5678, b"\x45\x00"),
    EbpfEvent(EbpfEventType.SYSCALL, 1234, 5678, b"", attributes={"syscall.name": "read"}),
    EbpfEvent(EbpfEventType.CPU_SAMPLE, 1234, 5679, b"", duration_ns=10_101_010),
]

converted = 0
for event in events:
    # Only important events are converted.
    if event.event_type == EbpfEventType.CPU_SAMPLE:
        span = converter.convert_event_to_span(event)
        span.end()
        converted += 1

provider.shutdown()
print(f"converted {converted} of {len(events)} events")
