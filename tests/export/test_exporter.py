"""OtlpGrpcExporter against a fault-injecting in-process gRPC server, and against the real Collector."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_svc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE, Metric, NumberDataPoint, Sum
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from receiver.config import ExporterConfig, RetryConfig
from receiver.export import OtlpGrpcExporter
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from ..harness import wait_until

NS = "ebpf_receiver_exporter"
RESOURCE = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="test"))])


# --------------------------------------------------------------------------- fault-injecting server

@dataclass
class Step:
    """What the server does with one call: answer OK (optionally with a response), abort with
    ``code`` (optionally with a RetryInfo delay in the status details), or hang first."""
    code: grpc.StatusCode = grpc.StatusCode.OK
    retry_delay: float | None = None
    hang: float = 0.0
    response: Any = None


@dataclass
class FakeTraceServer:
    steps: list[Step] = field(default_factory=list)
    calls: list[tuple[float, bytes]] = field(default_factory=list)       # every request received
    accepted: list[bytes] = field(default_factory=list)                  # requests answered OK
    server: Any = None
    port: int = 0

    async def _export(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls.append((time.monotonic(), request))
        step = self.steps.pop(0) if self.steps else Step()
        if step.hang:
            await asyncio.sleep(step.hang)
        if step.code != grpc.StatusCode.OK:
            trailers: tuple = ()
            if step.retry_delay is not None:
                secs = int(step.retry_delay)
                d = duration_pb2.Duration(seconds=secs, nanos=int(round((step.retry_delay - secs) * 1e9)))
                st = status_pb2.Status(code=step.code.value[0], message="injected")
                st.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=d))
                trailers = (("grpc-status-details-bin", st.SerializeToString()),)
            await context.abort(step.code, f"injected {step.code.name}", trailing_metadata=trailers)
        self.accepted.append(request)
        resp = step.response or trace_svc.ExportTraceServiceResponse()
        return resp.SerializeToString()

    async def start(self) -> "FakeTraceServer":
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)

    def delivered_span_names(self) -> Counter[str]:
        return delivered_span_names(self.accepted)


def delivered_span_names(accepted: list[bytes]) -> Counter[str]:
    """Span names in the trace export requests a fake server accepted (raw bodies)."""
    names: Counter[str] = Counter()
    for raw in accepted:
        req = trace_svc.ExportTraceServiceRequest.FromString(raw)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                names.update(s.name for s in ss.spans)
    return names


# --------------------------------------------------------------------------- helpers

def make_config(port: int, **overrides: Any) -> ExporterConfig:
    retry = RetryConfig(initial_interval=0.05, max_interval=0.2, max_elapsed_time=5.0,
                        randomization_factor=0.1)
    kw: dict[str, Any] = dict(endpoint=f"http://127.0.0.1:{port}", timeout=2.0, batch_timeout=0.05,
                              max_batch_size=100, queue_size=1000, retry=retry, shutdown_timeout=5.0)
    kw.update(overrides)
    return ExporterConfig(**kw)


def span(name: str) -> Span:
    return Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name=name, start_time_unix_nano=1,
                end_time_unix_nano=2)


def value(t: SelfTelemetry, name: str, **labels: str) -> float:
    return t.registry.get_sample_value(f"{NS}_{name}_total", labels) or 0.0


# --------------------------------------------------------------------------- the real Collector

def test_export_to_real_collector(collector: Any) -> None:
    telemetry = SelfTelemetry()
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="export-test"))])
    metric = Metric(name="export.test.sum", unit="1", sum=Sum(
        aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE, is_monotonic=True,
        data_points=[NumberDataPoint(as_int=42, start_time_unix_nano=1, time_unix_nano=time.time_ns())]))
    record = LogRecord(time_unix_nano=time.time_ns(), severity_text="INFO",
                       body=AnyValue(string_value="hello from the export test"))

    async def main() -> None:
        exp = OtlpGrpcExporter(ExporterConfig(endpoint=collector.endpoint, batch_timeout=0.05,
                                              timeout=5.0), telemetry)
        await exp.start()
        try:
            for i in range(3):
                assert exp.submit(Signal.TRACES, resource, span(f"real-{i}"))
            assert exp.submit(Signal.METRICS, resource, metric)
            assert exp.submit(Signal.LOGS, resource, record)
            await asyncio.wait_for(exp.flush(), 20)
        finally:
            await exp.shutdown()

    asyncio.run(main())
    spans = wait_until(lambda: [s for s in collector.spans() if s["name"].startswith("real-")]
                       if len(collector.spans()) >= 3 else None, 15, what="spans")
    assert sorted(s["name"] for s in spans) == ["real-0", "real-1", "real-2"]
    assert spans[0]["resource"]["service.name"] == "export-test"
    metrics = wait_until(lambda: [m for m in collector.metrics() if m["name"] == "export.test.sum"],
                         15, what="the metric")
    points = metrics[0]["sum"]["dataPoints"]
    assert int(points[0]["asInt"]) == 42
    logs = wait_until(lambda: [r for r in collector.log_records()
                               if r.get("body", {}).get("stringValue") == "hello from the export test"],
                      15, what="the log record")
    assert logs[0]["resource"]["service.name"] == "export-test"
    for sig, n in (("traces", 3), ("metrics", 1), ("logs", 1)):
        assert value(telemetry, "sent_items", signal=sig) == n


def test_flush_does_not_wait_for_a_fuller_batch() -> None:
    """flush() sends a part-filled batch at once instead of waiting out batch_timeout."""
    telemetry = SelfTelemetry()

    async def main() -> float:
        srv = await FakeTraceServer(steps=[]).start()
        exp = OtlpGrpcExporter(make_config(srv.port, batch_timeout=30.0), telemetry)
        try:
            await exp.start()
            await asyncio.sleep(0.05)          # the sender is idle, waiting for items
            assert exp.submit(Signal.TRACES, RESOURCE, span("one"))
            t0 = time.monotonic()
            await exp.flush()
            return time.monotonic() - t0
        finally:
            await exp.shutdown()
            await srv.stop()

    elapsed = asyncio.run(main())
    assert value(telemetry, "sent_items", signal="traces") == 1
    assert elapsed < 15.0, f"flush took {elapsed:.2f}s: as if it waited for batch_timeout (30s)"
