"""OTLP/HTTP against the real Collector (its HTTP receiver on the harness's second port): all
four signals read back in both encodings, the protocol and endpoints chosen by OTEL_* variables
(per-signal ones included, mixing gRPC and HTTP), and a large profiles request split into parts
that each carry the dictionary."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from receiver.config import EbpfConfig, ExporterConfig, RetryConfig, SignalExporterConfig
from receiver.export import OtlpExporter
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from ..harness import Collector, free_port, wait_until
from .test_exporter import span, value
from .test_profiles_signal import _request as profiles_request
from .test_split_and_routes import profiles_request as many_profiles


def resource(name: str) -> Resource:
    return Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=name))])


def metric(name: str, v: int) -> Metric:
    return Metric(name=name, unit="1", sum=Sum(
        aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE, is_monotonic=True,
        data_points=[NumberDataPoint(as_int=v, start_time_unix_nano=1, time_unix_nano=time.time_ns())]))


def record(body: str) -> LogRecord:
    return LogRecord(time_unix_nano=time.time_ns(), severity_text="INFO", body=AnyValue(string_value=body))


def export(config: ExporterConfig, submit: Any) -> SelfTelemetry:
    telemetry = SelfTelemetry()

    async def main() -> None:
        exp = OtlpExporter(config, telemetry)
        await exp.start()
        try:
            submit(exp)
            await asyncio.wait_for(exp.flush(), 30)
        finally:
            await exp.shutdown()

    asyncio.run(main())
    return telemetry


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json"])
def test_all_four_signals_over_http(collector: Collector, protocol: str) -> None:
    tag = protocol.replace("/", "-")
    res = resource(f"http-{tag}")

    def submit(exp: OtlpExporter) -> None:
        for i in range(3):
            assert exp.submit(Signal.TRACES, res, span(f"{tag}-{i}"))
        assert exp.submit(Signal.METRICS, res, metric(f"{tag}.sum", 42))
        assert exp.submit(Signal.LOGS, res, record(f"hello over {protocol}"))
        assert exp.submit_request(Signal.PROFILES, profiles_request())

    t = export(ExporterConfig(protocol=protocol, endpoint=collector.http_endpoint, batch_timeout=0.05,
                              timeout=5.0), submit)
    for sig, n in (("traces", 3), ("metrics", 1), ("logs", 1), ("profiles", 1)):
        assert value(t, "sent_items", signal=sig) == n, sig
        assert value(t, "requests", signal=sig, status="200") >= 1, sig
    spans = wait_until(lambda: [s for s in collector.spans() if s["name"].startswith(tag)]
                       if len(collector.spans()) >= 3 else None, 15, what="spans")
    assert sorted(s["name"] for s in spans) == [f"{tag}-0", f"{tag}-1", f"{tag}-2"]
    assert spans[0]["resource"]["service.name"] == f"http-{tag}"
    assert spans[0]["traceId"] == "01" * 16 and spans[0]["spanId"] == "02" * 8
    metrics = wait_until(lambda: [m for m in collector.metrics() if m["name"] == f"{tag}.sum"], 15,
                         what="the metric")
    assert int(metrics[0]["sum"]["dataPoints"][0]["asInt"]) == 42
    wait_until(lambda: [r for r in collector.log_records()
                        if r.get("body", {}).get("stringValue") == f"hello over {protocol}"],
               15, what="the log record")
    reqs = wait_until(lambda: collector.requests("profiles"), 15, what="the profile")
    assert "burn_a" in reqs[0]["dictionary"]["stringTable"]


def test_protocol_and_per_signal_endpoints_from_otel_variables(collector: Collector) -> None:
    """Shared endpoint dead; traces by their own full URL over HTTP, logs by theirs over gRPC,
    metrics by the shared HTTP endpoint with /v1/metrics appended."""
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint,
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.http_endpoint}/v1/traces",
           "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": collector.endpoint,
           "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "none"}
    config = EbpfConfig.load(None, environ=env).exporter
    config = dataclasses.replace(config, batch_timeout=0.05)
    res = resource("env-routes")

    def submit(exp: OtlpExporter) -> None:
        routes = exp.routes()
        assert routes[Signal.LOGS].protocol == "grpc"
        assert routes[Signal.METRICS].url == f"{collector.http_endpoint}/v1/metrics"
        assert exp.submit(Signal.TRACES, res, span("env-span"))
        assert exp.submit(Signal.METRICS, res, metric("env.sum", 7))
        assert exp.submit(Signal.LOGS, res, record("env log"))

    t = export(config, submit)
    assert value(t, "requests", signal="traces", status="200") == 1
    assert value(t, "requests", signal="metrics", status="200") == 1
    assert value(t, "requests", signal="logs", status="OK") == 1
    wait_until(lambda: [s for s in collector.spans() if s["name"] == "env-span"], 15, what="the span")
    wait_until(lambda: [m for m in collector.metrics() if m["name"] == "env.sum"], 15, what="the metric")
    wait_until(lambda: [r for r in collector.log_records()
                        if r.get("body", {}).get("stringValue") == "env log"], 15, what="the log")


def test_wrong_path_is_a_permanent_404(collector: Collector) -> None:
    config = ExporterConfig(protocol="http/protobuf", endpoint=collector.http_endpoint,
                            batch_timeout=0.05, traces=SignalExporterConfig(endpoint=f"{collector.http_endpoint}/nope"))
    t = export(config, lambda exp: exp.submit(Signal.TRACES, resource("x"), span("lost")))
    assert value(t, "requests", signal="traces", status="404") == 1
    assert value(t, "dropped_items", signal="traces", reason="permanent_error") == 1


def test_grpc_spoken_to_the_http_port_fails_and_is_counted(collector: Collector,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    config = ExporterConfig(endpoint=f"http://127.0.0.1:{collector.http_port}", batch_timeout=0.05,
                            retry=RetryConfig(enabled=False), timeout=3.0)
    t = export(config, lambda exp: exp.submit(Signal.TRACES, resource("x"), span("lost")))
    assert "set exporter.protocol: http/protobuf" in caplog.text
    assert value(t, "sent_items", signal="traces") == 0
    assert value(t, "dropped_items", signal="traces", reason="retries_exhausted") + \
        value(t, "dropped_items", signal="traces", reason="permanent_error") == 1


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_large_profiles_request_is_split_and_every_part_arrives(collector: Collector,
                                                                 protocol: str) -> None:
    req = many_profiles(processes=8, samples=300)
    limit = req.ByteSize() // 3
    endpoint = collector.endpoint if protocol == "grpc" else collector.http_endpoint
    config = ExporterConfig(protocol=protocol, endpoint=endpoint, batch_timeout=0.05,
                            max_request_bytes=limit)
    t = export(config, lambda exp: exp.submit_request(Signal.PROFILES, req))
    assert value(t, "sent_items", signal="profiles") == 16
    assert value(t, "requests", signal="profiles", status="OK" if protocol == "grpc" else "200") >= 3

    def all_there() -> list[Any] | None:
        reqs = collector.requests("profiles")
        n = sum(len(sp.get("profiles", [])) for r in reqs for rp in r.get("resourceProfiles", [])
                for sp in rp.get("scopeProfiles", []))
        return reqs if n >= 16 else None

    reqs = wait_until(all_there, 15, what="16 profiles")
    assert len(reqs) >= 3
    assert all(r["dictionary"]["stringTable"][3] == "fn0" for r in reqs)


def test_http_exporter_to_a_closed_port_counts_unavailable() -> None:
    config = ExporterConfig(protocol="http/protobuf", endpoint=f"http://127.0.0.1:{free_port()}",
                            batch_timeout=0.05, retry=RetryConfig(enabled=False))
    t = export(config, lambda exp: exp.submit(Signal.LOGS, None, record("nobody")))
    assert value(t, "requests", signal="logs", status="UNAVAILABLE") == 1
    assert value(t, "dropped_items", signal="logs", reason="retries_exhausted") == 1


@pytest.mark.bpf
def test_agent_exports_over_http_when_the_environment_says_so(bpf_ok: None, collector: Collector,
                                                              tmp_path: Any) -> None:
    """The real agent, its exporter chosen by OTEL_EXPORTER_OTLP_PROTOCOL (the file says gRPC)."""
    import subprocess

    from ..harness import Agent, agent_config

    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint}
    agent = Agent(tmp_path, agent_config(collector, {"process": {}}), env=env).start()
    try:
        for _ in range(3):
            subprocess.run(["/bin/true"], check=True)
        wait_until(lambda: [r for r in collector.log_records() if r.get("eventName") == "process.exec"
                            and r["attrs"].get("process.executable.path") == "/bin/true"],
                   20, what="exec records sent over OTLP/HTTP")
        assert agent.metric_value("ebpf_receiver_exporter_requests_total", signal="logs", status="200") >= 1
        assert agent.metric_value("ebpf_receiver_exporter_requests_total", signal="logs", status="OK") == 0
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
