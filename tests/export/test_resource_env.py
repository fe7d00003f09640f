"""``OTEL_RESOURCE_ATTRIBUTES`` and ``K8S_NODE_NAME`` reach the resources the agent exports: the
config loaded from the process environment as the CLI loads it, the service's own wiring
(host attributes → pipeline → exporter), one process event through the pipeline, and the
request an in-process OTLP/gRPC server receives."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_svc

from receiver.config import EbpfConfig
from receiver.model import EbpfEventType
from receiver.records import ProcessRecord


class RecordingLogsServer:
    """OTLP/gRPC LogsService that accepts everything and keeps the raw requests."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: Any = None
        self.port = 0

    async def _export(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.requests.append(request)
        return b""

    async def start(self) -> RecordingLogsServer:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.logs.v1.LogsService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self


def _attrs(resource: Any) -> dict[str, Any]:
    out = {}
    for kv in resource.attributes:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_resource_attributes_and_node_name_reach_the_exported_resource(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from receiver.service import Service

    srv_holder: list[RecordingLogsServer] = []

    async def main() -> Any:
        srv = await RecordingLogsServer().start()
        srv_holder.append(srv)
        monkeypatch.setenv("K8S_NODE_NAME", "node-7")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES",
                           "deployment.environment.name=prod,k8s.cluster.name=blue%2Cgreen")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{srv.port}")
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        config = EbpfConfig.load(None)   # as the CLI: the process environment
        service = Service(config, least_privilege=False)
        await service.exporter.start()
        try:
            pid = os.getpid()
            service.pipeline.consume_event(ProcessRecord(
                EbpfEventType.PROCESS_EXEC, pid, pid, 1, "python", executable_path="/usr/bin/python3"))
            await asyncio.wait_for(service.exporter.flush(), 20)
        finally:
            await service.exporter.shutdown()
            await srv.server.stop(0)
        return service

    service = asyncio.run(main())
    (raw,) = srv_holder[0].requests
    (rl,) = logs_svc.ExportLogsServiceRequest.FromString(raw).resource_logs
    attrs = _attrs(rl.resource)
    expected = {"host.name": "node-7", "k8s.node.name": "node-7",
                "deployment.environment.name": "prod", "k8s.cluster.name": "blue,green",
                "service.name": "ebpf-otlp-receiver", "os.type": "linux"}
    assert {k: attrs.get(k) for k in expected} == expected
    assert attrs["process.pid"] == os.getpid()
    host = _attrs(service.pipeline.resources.host_resource)   # items of no process
    assert {k: host.get(k) for k in expected} == expected


def test_resource_attributes_from_the_environment_win_over_the_detected_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The DaemonSet sets both: OTEL_RESOURCE_ATTRIBUTES=k8s.node.name=$(K8S_NODE_NAME). What the
    user sets names the resource, over what the agent detects (host.name here)."""
    from receiver.kernel.identity import detect_host_attributes

    monkeypatch.setenv("K8S_NODE_NAME", "node-7")
    config = EbpfConfig.from_dict({}, environ={"OTEL_RESOURCE_ATTRIBUTES": "host.name=override"})
    attrs = detect_host_attributes(config.resource)
    assert attrs["host.name"] == "override"
    assert attrs["k8s.node.name"] == "node-7"
