"""Event to metric, in a batch: events collected first, then each converted into the meter's
instruments (created once), exported by the SDK's periodic reader.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 python examples/event_to_metric.py
"""

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from receiver import EbpfEvent, EbpfEventType, EbpfOtlpConverter

reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=60_000)
provider = MeterProvider(metric_readers=[reader])
meter = provider.get_meter("ebpf-example")

converter = EbpfOtlpConverter().with_meter(meter)

# Collect several events, then convert them in a batch.
events = []
for i in range(10):
    events.append(EbpfEvent(EbpfEventType.SYSCALL, 1234, 5678, b"", duration_ns=1_000 * (i + 1),
                            attributes={"syscall.name": "read"}))

for event in events:
    converter.convert_event_to_metric(event)

provider.shutdown()   # exports what was recorded
print(f"recorded {len(events)} syscall durations")
