"""Error handling, the document's three outcomes: a span; None (no tracer set); a conversion
error for a malformed event, which is logged and does not stop the others.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 python examples/error_handling.py
"""

import logging

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from receiver import ConversionError, EbpfEvent, EbpfEventType, EbpfOtlpConverter

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
log = logging.getLogger("example")

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
with_tracer = EbpfOtlpConverter().with_tracer(provider.get_tracer("ebpf-example"))
without_tracer = EbpfOtlpConverter()

good = EbpfEvent(EbpfEventType.SYSCALL, 1234, 5678, b"", duration_ns=2_000_000,
                 attributes={"syscall.name": "openat", "syscall.return_value": -2})
malformed = EbpfEvent(EbpfEventType.NETWORK_CONNECTION, 1234, 5678, b"")   # no direction: not a connection

for converter, event in ((with_tracer, good), (without_tracer, good), (with_tracer, malformed)):
    try:
        span = converter.convert_event_to_span(event)
    except ConversionError as e:
        log.error("conversion failed: %s", e)        # handle the error
        continue
    if span is not None:
        log.info("converted: %s", event.event_type.value)   # success
        span.end()
    else:
        log.info("no tracer set")

provider.shutdown()
