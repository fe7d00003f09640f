"""Event to span, as the design document shows it: a NETWORK_PACKET event becomes a live span on
the caller's tracer; the caller adds an attribute and ends it.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 python examples/event_to_span.py
"""

import os

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from receiver import EbpfEvent, EbpfEventType, EbpfOtlpConverter

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("ebpf-example")

converter = EbpfOtlpConverter().with_tracer(tracer)

event = EbpfEvent(EbpfEventType.NETWORK_PACKET, 1234, 5678, b"")

span = converter.convert_event_to_span(event)
if span is not None:
    # The span is created: more attributes can be set.
    span.set_attribute("network.protocol", "TCP")
    span.set_attribute("example.run", os.environ.get("EXAMPLE_RUN", ""))
    span.end()

provider.shutdown()
print("sent one span for a network packet")
