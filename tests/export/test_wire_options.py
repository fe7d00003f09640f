"""What the exporter puts on the wire, seen from the other end: user headers (from
``OTEL_EXPORTER_OTLP_HEADERS``) as gRPC metadata on every attempt, gzip actually shrinking the
bytes on the connection (a TCP proxy counts them) for both transports, and requests never
holding more than ``max_batch_size`` items."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_svc

from receiver.config import EbpfConfig
from receiver.export import OtlpExporter
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from .test_exporter import RESOURCE, FakeTraceServer, Step, span, value
from .test_fault_suite import config, deliver, start_server


class ByteCountingProxy:
    """A TCP proxy on 127.0.0.1 counting the bytes the client sends to the server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.upstream = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    count: bool) -> None:
        try:
            while data := await reader.read(65536):
                if count:
                    self.upstream += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        for t in (asyncio.create_task(self._pump(cr, sw, True)),
                  asyncio.create_task(self._pump(sr, cw, False))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def start(self) -> ByteCountingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --------------------------------------------------------------------------- gRPC headers

class MetadataTraceServer(FakeTraceServer):
    """FakeTraceServer that also keeps each call's invocation metadata."""

    def __init__(self, steps: list[Step]):
        super().__init__(steps=steps)
        self.metadata: list[dict[str, str]] = []

    async def _export(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata.append({m.key: m.value for m in context.invocation_metadata()})
        return await super()._export(request, context)


def test_grpc_headers_from_the_environment_go_as_metadata_on_every_attempt() -> None:
    telemetry = SelfTelemetry()
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20s3cr3t,X-Tenant=t1"}

    async def main() -> MetadataTraceServer:
        srv = await MetadataTraceServer([Step(grpc.StatusCode.UNAVAILABLE), Step()]).start()
        exporter = EbpfConfig.from_dict({"exporter": {
            "endpoint": f"http://127.0.0.1:{srv.port}", "batch_timeout": "50ms",
            "retry": {"initial_interval": "50ms", "max_interval": "100ms"}}}, environ=env).exporter
        await deliver(OtlpExporter(exporter, telemetry), ["h"], srv)
        return srv

    srv = asyncio.run(main())
    assert len(srv.metadata) == 2   # the failed attempt and the retry
    for md in srv.metadata:
        assert md.get("authorization") == "Bearer s3cr3t", md
        assert md.get("x-tenant") == "t1", md
        assert md.get("user-agent", "").startswith("ebpf-otlp-receiver/"), md
    assert value(telemetry, "sent_items", signal="traces") == 1


# --------------------------------------------------------------------------- gzip on the wire

@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_gzip_shrinks_the_bytes_on_the_connection(transport: str) -> None:
    """200 KB of very compressible span names: with gzip the client sends a small fraction of
    that; with compression none (the control) it sends all of it."""
    names = [f"{i:02d}" + "z" * 4000 for i in range(50)]
    raw = sum(len(n) for n in names)
    sent: dict[str, int] = {}

    async def main(compression: str) -> None:
        srv = await start_server(transport, [])
        proxy = await ByteCountingProxy(srv.port).start()
        await deliver(OtlpExporter(config(transport, proxy.port, compression=compression), SelfTelemetry()),
                      names, proxy, srv)
        got = srv.delivered_span_names()
        assert sorted(got) == sorted(names) and max(got.values()) == 1
        sent[compression] = proxy.upstream

    for compression in ("gzip", "none"):
        asyncio.run(main(compression))
    assert sent["none"] > raw, sent
    assert sent["gzip"] < raw / 10, sent


# --------------------------------------------------------------------------- batch size limit

@pytest.fixture(params=["grpc", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def _request_sizes(bodies: list[bytes]) -> list[int]:
    return [sum(len(ss.spans) for rs in trace_svc.ExportTraceServiceRequest.FromString(b).resource_spans
                for ss in rs.scope_spans) for b in bodies]


def test_no_request_holds_more_than_max_batch_size_items(transport: str) -> None:
    telemetry = SelfTelemetry()

    async def main() -> Any:
        srv = await start_server(transport, [])
        # submitted at once, before the sender runs
        await deliver(OtlpExporter(config(transport, srv.port, max_batch_size=10, batch_timeout=30.0), telemetry),
                      [f"b{i}" for i in range(25)], srv)
        return srv

    srv = asyncio.run(main())
    assert _request_sizes(srv.accepted) == [10, 10, 5]
    assert value(telemetry, "sent_items", signal="traces") == 25


def test_a_full_batch_is_sent_without_waiting_for_batch_timeout(transport: str) -> None:
    """The sender waits for more items after the first (batch_timeout 30 s here); reaching
    max_batch_size must send the batch at once, with no flush() asked for."""
    telemetry = SelfTelemetry()

    async def main() -> list[bytes]:
        srv = await start_server(transport, [])
        exp = OtlpExporter(config(transport, srv.port, max_batch_size=8, batch_timeout=30.0), telemetry)
        try:
            await exp.start()
            assert exp.submit(Signal.TRACES, RESOURCE, span("first"))
            await asyncio.sleep(0.1)   # the sender now waits out batch_timeout for a fuller batch
            for i in range(7):
                assert exp.submit(Signal.TRACES, RESOURCE, span(f"more{i}"))
            t0 = time.monotonic()
            while not srv.accepted and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.01)
            return list(srv.accepted)   # before shutdown(), which would send what is left
        finally:
            await exp.shutdown()
            await srv.stop()

    accepted = asyncio.run(main())
    assert accepted, "the full batch was not sent within 5 s (batch_timeout is 30 s)"
    assert _request_sizes(accepted) == [8]

