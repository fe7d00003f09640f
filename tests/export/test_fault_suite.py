"""The exporter's fault suite, run over both transports: the same faults injected by an
in-process OTLP/gRPC server (``test_exporter.FakeTraceServer``) and by an in-process OTLP/HTTP
server (aiohttp), with the same queue, batching, retry and shutdown behaviour expected of both.
Only the ``status`` label differs: gRPC status names there, HTTP status codes here."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_svc

from receiver.config import RetryConfig
from receiver.export import OtlpExporter
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from .test_exporter import RESOURCE, FakeTraceServer, Step, delivered_span_names, make_config, span, value


@dataclass
class Fault:
    """What the server does with one request, in terms both transports have."""
    kind: str = "ok"                  # ok | unavailable | throttle | permanent
    delay: float | None = None        # throttle: the server's delay (RetryInfo / Retry-After)
    hang: float = 0.0
    rejected: int = 0                 # ok: partial success
    message: str = ""
    http_status: int | None = None    # HTTP only: this exact status instead of the kind's


GRPC_CODES = {"ok": grpc.StatusCode.OK, "unavailable": grpc.StatusCode.UNAVAILABLE,
              "throttle": grpc.StatusCode.RESOURCE_EXHAUSTED,
              "permanent": grpc.StatusCode.INVALID_ARGUMENT}
HTTP_STATUS = {"ok": 200, "unavailable": 503, "throttle": 429, "permanent": 400}
LABELS = {"grpc": {"ok": "OK", "unavailable": "UNAVAILABLE", "throttle": "RESOURCE_EXHAUSTED",
                   "permanent": "INVALID_ARGUMENT", "timeout": "DEADLINE_EXCEEDED"},
          "http": {"ok": "200", "unavailable": "503", "throttle": "429", "permanent": "400",
                   "timeout": "DEADLINE_EXCEEDED"}}


def _response(f: Fault) -> trace_svc.ExportTraceServiceResponse | None:
    if not (f.rejected or f.message):
        return None
    return trace_svc.ExportTraceServiceResponse(partial_success=trace_svc.ExportTracePartialSuccess(
        rejected_spans=f.rejected, error_message=f.message))


@dataclass
class FakeHttpServer:
    """OTLP/HTTP traces endpoint injecting faults; records each request body (gunzipped)."""
    faults: list[Fault] = field(default_factory=list)
    calls: list[tuple[float, bytes]] = field(default_factory=list)
    accepted: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    runner: Any = None

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp has already undone Content-Encoding: gzip
        self.calls.append((time.monotonic(), body))
        self.headers.append(dict(request.headers))
        f = self.faults.pop(0) if self.faults else Fault()
        if f.hang:
            await asyncio.sleep(f.hang)
        status = f.http_status or HTTP_STATUS[f.kind]
        if status != 200:
            headers = {"Retry-After": str(int(f.delay))} if f.delay is not None else {}
            st = status_pb2.Status(code=14, message=f"injected {status}")
            return web.Response(status=status, body=st.SerializeToString(), headers=headers,
                                content_type="application/x-protobuf")
        self.accepted.append(body)
        resp = _response(f) or trace_svc.ExportTraceServiceResponse()
        if request.content_type == "application/json":
            from google.protobuf import json_format
            return web.Response(text=json_format.MessageToJson(resp), content_type="application/json")
        return web.Response(body=resp.SerializeToString(), content_type="application/x-protobuf")

    async def start(self) -> FakeHttpServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        # A client that timed out and went away cancels the handler, as gRPC cancels the call.
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    def delivered_span_names(self) -> Counter[str]:
        return delivered_span_names(self.accepted)


async def start_server(transport: str, faults: list[Fault]) -> Any:
    if transport == "http":
        return await FakeHttpServer(faults=list(faults)).start()
    steps = [Step(GRPC_CODES[f.kind], f.delay, f.hang, _response(f)) for f in faults]
    return await FakeTraceServer(steps=steps).start()


def config(transport: str, port: int, **overrides: Any) -> Any:
    overrides.setdefault("protocol", "grpc" if transport == "grpc" else "http/protobuf")
    return make_config(port, **overrides)


@pytest.fixture(params=["grpc", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


async def deliver(exp: OtlpExporter, names: list[str], *servers: Any) -> None:
    """Starts ``exp``, submits one span per name, flushes, then shuts it down and stops
    ``servers`` (fake servers, proxies) whatever happened."""
    try:
        await exp.start()
        for n in names:
            assert exp.submit(Signal.TRACES, RESOURCE, span(n))
        await asyncio.wait_for(exp.flush(), 20)
        await exp.shutdown()
    finally:
        await exp.shutdown()
        for s in servers:
            await s.stop()


def run_export(transport: str, faults: list[Fault], names: list[str],
               **overrides: Any) -> tuple[Any, SelfTelemetry]:
    """Starts the fake server and an exporter, submits one span per name, flushes, shuts down."""
    telemetry = SelfTelemetry()

    async def main() -> Any:
        srv = await start_server(transport, faults)
        await deliver(OtlpExporter(config(transport, srv.port, **overrides), telemetry), names, srv)
        return srv

    return asyncio.run(main()), telemetry


# --------------------------------------------------------------------------- the suite

def test_retryable_three_times_then_ok_delivers_each_span_once(transport: str) -> None:
    names = [f"span-{i}" for i in range(10)]
    srv, t = run_export(transport, [Fault("unavailable")] * 3 + [Fault()], names)
    label = LABELS[transport]
    assert len(srv.calls) == 4
    assert srv.delivered_span_names() == Counter(names)
    assert value(t, "retries", signal="traces") == 3
    assert value(t, "requests", signal="traces", status=label["unavailable"]) == 3
    assert value(t, "requests", signal="traces", status=label["ok"]) == 1
    assert value(t, "sent_items", signal="traces") == 10
    assert all(value(t, "dropped_items", signal="traces", reason=r) == 0
               for r in ("permanent_error", "retries_exhausted", "shutdown"))


def test_grpc_resource_exhausted_without_retry_info_is_permanent() -> None:
    """gRPC's own rule: RESOURCE_EXHAUSTED is retried only when the server says when (RetryInfo)."""
    srv, t = run_export("grpc", [Fault("throttle")], ["a", "b", "c"])
    assert len(srv.calls) == 1
    assert value(t, "dropped_items", signal="traces", reason="permanent_error") == 3
    assert value(t, "retries", signal="traces") == 0
    assert value(t, "requests", signal="traces", status="RESOURCE_EXHAUSTED") == 1
    assert value(t, "sent_items", signal="traces") == 0


def test_throttled_waits_the_server_delay(transport: str) -> None:
    # Retry-After carries whole seconds; the backoff's own delay (0.05 s) would be far shorter.
    srv, t = run_export(transport, [Fault("throttle", delay=1.0), Fault()], ["a", "b"])
    assert len(srv.calls) == 2
    gap = srv.calls[1][0] - srv.calls[0][0]
    assert gap >= 1.0, gap
    assert srv.delivered_span_names() == Counter(["a", "b"])
    assert value(t, "requests", signal="traces", status=LABELS[transport]["throttle"]) == 1
    assert value(t, "retries", signal="traces") == 1
    assert value(t, "sent_items", signal="traces") == 2


def test_permanent_error_is_dropped_without_retry(transport: str) -> None:
    srv, t = run_export(transport, [Fault("permanent"), Fault()], ["a", "b", "c", "d"])
    assert len(srv.calls) == 1
    assert srv.accepted == []
    assert value(t, "dropped_items", signal="traces", reason="permanent_error") == 4
    assert value(t, "requests", signal="traces", status=LABELS[transport]["permanent"]) == 1
    assert value(t, "retries", signal="traces") == 0


def test_partial_success_counts_rejected_and_does_not_retry(transport: str) -> None:
    srv, t = run_export(transport, [Fault(rejected=2, message="bad spans")], [f"s{i}" for i in range(5)])
    assert len(srv.calls) == 1
    assert value(t, "dropped_items", signal="traces", reason="rejected") == 2
    assert value(t, "sent_items", signal="traces") == 3
    assert value(t, "retries", signal="traces") == 0


def test_hanging_server_hits_the_timeout_then_retry_succeeds(transport: str) -> None:
    srv, t = run_export(transport, [Fault(hang=1.5), Fault()], ["a", "b"], timeout=0.3)
    assert len(srv.calls) == 2
    assert value(t, "requests", signal="traces", status="DEADLINE_EXCEEDED") == 1
    assert value(t, "retries", signal="traces") == 1
    assert srv.delivered_span_names() == Counter(["a", "b"])
    assert value(t, "sent_items", signal="traces") == 2


def test_queue_is_bounded_and_full_is_counted(transport: str) -> None:
    telemetry = SelfTelemetry()
    capacity = 20

    def depth() -> float:
        return telemetry.registry.get_sample_value("ebpf_receiver_exporter_queue_items",
                                                   {"signal": "traces"})

    async def main() -> Any:
        srv = await start_server(transport, [Fault(hang=1.0)])  # keeps a batch in flight
        exp = OtlpExporter(config(transport, srv.port, queue_size=capacity, max_batch_size=5,
                                  timeout=5.0), telemetry)
        try:
            await exp.start()
            accepted = 0
            for i in range(capacity + 7):
                accepted += exp.submit(Signal.TRACES, RESOURCE, span(f"q{i}"))
            assert depth() <= capacity
            await asyncio.sleep(0.3)
            for i in range(capacity + 7, capacity + 17):
                accepted += exp.submit(Signal.TRACES, RESOURCE, span(f"q{i}"))
                assert depth() <= capacity
            dropped = value(telemetry, "dropped_items", signal="traces", reason="queue_full")
            assert accepted + dropped == capacity + 17
            assert dropped >= 7
            await asyncio.wait_for(exp.flush(), 20)
            assert value(telemetry, "sent_items", signal="traces") == accepted
        finally:
            await exp.shutdown()
            await srv.stop()
        return srv

    srv = asyncio.run(main())
    assert sum(srv.delivered_span_names().values()) == value(telemetry, "sent_items", signal="traces")


def test_batch_over_max_request_bytes_is_split(transport: str) -> None:
    limit = 2048
    names = [f"{i:03d}-" + "x" * 200 for i in range(40)]
    srv, t = run_export(transport, [], names, max_request_bytes=limit, max_batch_size=40)
    assert len(srv.calls) > 1
    assert all(len(raw) <= limit for _, raw in srv.calls), [len(raw) for _, raw in srv.calls]
    assert srv.delivered_span_names() == Counter(names)
    assert value(t, "sent_items", signal="traces") == 40
    assert value(t, "dropped_items", signal="traces", reason="too_large") == 0


def test_one_item_over_max_request_bytes_is_dropped_as_too_large(transport: str) -> None:
    names = ["small-a", "big-" + "x" * 3000, "small-b"]
    srv, t = run_export(transport, [], names, max_request_bytes=2048)
    assert srv.delivered_span_names() == Counter(["small-a", "small-b"])
    assert value(t, "dropped_items", signal="traces", reason="too_large") == 1
    assert value(t, "sent_items", signal="traces") == 2


def test_retries_stop_after_max_elapsed_time(transport: str) -> None:
    retry = RetryConfig(initial_interval=0.05, max_interval=0.1, max_elapsed_time=0.4,
                        randomization_factor=0.1)
    srv, t = run_export(transport, [Fault("unavailable")] * 100, ["a", "b", "c"], retry=retry)
    assert 2 <= len(srv.calls) < 20
    assert srv.accepted == []
    assert value(t, "dropped_items", signal="traces", reason="retries_exhausted") == 3
    assert value(t, "retries", signal="traces") == len(srv.calls) - 1
    assert value(t, "requests", signal="traces", status=LABELS[transport]["unavailable"]) == len(srv.calls)


def test_shutdown_while_retrying_accounts_for_every_item(transport: str) -> None:
    telemetry = SelfTelemetry()
    retry = RetryConfig(initial_interval=0.05, max_interval=0.1, max_elapsed_time=60.0,
                        randomization_factor=0.1)

    async def main() -> float:
        srv = await start_server(transport, [Fault("unavailable")] * 1000)
        exp = OtlpExporter(config(transport, srv.port, retry=retry, shutdown_timeout=0.5,
                                  max_batch_size=10), telemetry)
        try:
            await exp.start()
            for i in range(25):
                assert exp.submit(Signal.TRACES, RESOURCE, span(f"s{i}"))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await exp.shutdown()
            elapsed = time.monotonic() - t0
            assert not exp.submit(Signal.TRACES, RESOURCE, span("late"))
        finally:
            await exp.shutdown()
            await srv.stop()
        return elapsed

    elapsed = asyncio.run(main())
    # Retrying could go on for max_elapsed_time (60 s); shutdown ends it near its own 0.5 s.
    # The bound is generous for a loaded CI runner and still far from the retry budget.
    assert elapsed < 15.0, elapsed
    assert value(telemetry, "sent_items", signal="traces") == 0
    # 25 submitted before shutdown + 1 after; max_elapsed_time was far away, so all are shutdown
    # losses, not exhausted retries.
    assert value(telemetry, "dropped_items", signal="traces", reason="shutdown") == 26
    assert value(telemetry, "dropped_items", signal="traces", reason="retries_exhausted") == 0


def test_connection_refused_is_retried_then_counted(transport: str) -> None:
    from ..harness import free_port

    retry = RetryConfig(initial_interval=0.05, max_interval=0.1, max_elapsed_time=0.3)
    telemetry = SelfTelemetry()

    async def main() -> None:
        exp = OtlpExporter(config(transport, free_port(), retry=retry), telemetry)
        await exp.start()
        try:
            assert exp.submit(Signal.TRACES, RESOURCE, span("nowhere"))
            await asyncio.wait_for(exp.flush(), 20)
        finally:
            await exp.shutdown()

    asyncio.run(main())
    assert value(telemetry, "requests", signal="traces", status="UNAVAILABLE") >= 2
    assert value(telemetry, "dropped_items", signal="traces", reason="retries_exhausted") == 1


# --------------------------------------------------------------------------- HTTP only

@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_http_retryable_statuses(status: int) -> None:
    srv, t = run_export("http", [Fault(http_status=status), Fault()], ["a"])
    assert len(srv.calls) == 2
    assert value(t, "requests", signal="traces", status=str(status)) == 1
    assert value(t, "sent_items", signal="traces") == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 500])
def test_http_other_statuses_are_permanent(status: int) -> None:
    srv, t = run_export("http", [Fault(http_status=status), Fault()], ["a", "b"])
    assert len(srv.calls) == 1
    assert value(t, "requests", signal="traces", status=str(status)) == 1
    assert value(t, "dropped_items", signal="traces", reason="permanent_error") == 2


def test_http_request_headers_gzip_and_user_headers() -> None:
    srv, _ = run_export("http", [], ["a"], headers={"X-Tenant": "t1"})
    h = srv.headers[0]
    assert h["Content-Type"] == "application/x-protobuf"
    assert h["Content-Encoding"] == "gzip"
    assert h["x-tenant"] == "t1"
    assert h["User-Agent"].startswith("ebpf-otlp-receiver/")


def test_http_connection_is_reused_across_requests() -> None:
    """HTTP/1.1 keep-alive: many requests, one TCP connection."""
    peers: list[Any] = []

    async def main() -> None:
        srv = FakeHttpServer()
        original = srv._export

        async def export(request: web.Request) -> web.Response:
            peers.append(request.transport.get_extra_info("peername"))
            return await original(request)

        srv._export = export  # type: ignore[method-assign]
        await srv.start()
        telemetry = SelfTelemetry()
        exp = OtlpExporter(config("http", srv.port), telemetry)
        await exp.start()
        try:
            for i in range(5):
                assert exp.submit(Signal.TRACES, RESOURCE, span(f"k{i}"))
                await exp.flush()
        finally:
            await exp.shutdown()
            await srv.stop()

    asyncio.run(main())
    assert len(peers) == 5
    assert len(set(peers)) == 1, peers


def test_http_json_body_uses_hex_ids_and_reads_a_json_partial_success() -> None:
    srv, t = run_export("http", [Fault(rejected=1, message="one bad")], ["a", "b"],
                        protocol="http/json", compression="none")
    assert srv.headers[0]["Content-Type"] == "application/json"
    body = json.loads(srv.calls[0][1])
    s = body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert s["traceId"] == "01" * 16 and s["spanId"] == "02" * 8
    assert s["name"] == "a"
    assert value(t, "dropped_items", signal="traces", reason="rejected") == 1
    assert value(t, "sent_items", signal="traces") == 1


def test_ready_made_requests_take_their_items_in_the_queue_and_are_sent_whole(transport: str) -> None:
    """submit_request works for any signal: a request counts its items against the queue bound,
    is never merged with other requests, and submit() of a whole request does the same."""
    telemetry = SelfTelemetry()

    def request(prefix: str, n: int) -> trace_svc.ExportTraceServiceRequest:
        req = trace_svc.ExportTraceServiceRequest()
        req.resource_spans.add(resource=RESOURCE).scope_spans.add().spans.extend(
            span(f"{prefix}{i}") for i in range(n))
        return req

    async def main() -> Any:
        srv = await start_server(transport, [])
        exp = OtlpExporter(config(transport, srv.port, queue_size=20, max_batch_size=10), telemetry)
        try:
            await exp.start()
            assert exp.submit_request(Signal.TRACES, request("a", 12))
            assert not exp.submit_request(Signal.TRACES, request("b", 9))   # 12 + 9 > 20
            assert exp.submit(Signal.TRACES, None, request("c", 8))         # a whole request
            await asyncio.wait_for(exp.flush(), 20)
        finally:
            await exp.shutdown()
            await srv.stop()
        return srv

    srv = asyncio.run(main())
    assert value(telemetry, "dropped_items", signal="traces", reason="queue_full") == 9
    assert value(telemetry, "sent_items", signal="traces") == 20
    sizes = [len(trace_svc.ExportTraceServiceRequest.FromString(raw).resource_spans[0].scope_spans[0].spans)
             for raw in srv.accepted]
    assert sizes == [12, 8]


# --------------------------------------------------------------------------- gRPC only

def run_grpc_steps(steps: list[Step], names: list[str]) -> tuple[FakeTraceServer, SelfTelemetry]:
    """As run_export, with any gRPC status the server should answer."""
    telemetry = SelfTelemetry()

    async def main() -> FakeTraceServer:
        srv = await FakeTraceServer(steps=list(steps)).start()
        await deliver(OtlpExporter(config("grpc", srv.port), telemetry), names, srv)
        return srv

    return asyncio.run(main()), telemetry


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                                  grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS])
def test_grpc_retryable_codes_returned_by_the_server(code: grpc.StatusCode) -> None:
    """The OTLP/gRPC retryable codes the suite above does not reach (UNAVAILABLE, a client-side
    DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED with RetryInfo are covered there)."""
    srv, t = run_grpc_steps([Step(code), Step(code), Step()], ["a", "b"])
    assert len(srv.calls) == 3
    assert value(t, "requests", signal="traces", status=code.name) == 2
    assert value(t, "retries", signal="traces") == 2
    assert srv.delivered_span_names() == Counter(["a", "b"])
    assert value(t, "sent_items", signal="traces") == 2
    assert value(t, "dropped_items", signal="traces", reason="permanent_error") == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION])
def test_grpc_other_codes_are_permanent(code: grpc.StatusCode) -> None:
    srv, t = run_grpc_steps([Step(code), Step()], ["a", "b"])
    assert len(srv.calls) == 1
    assert value(t, "requests", signal="traces", status=code.name) == 1
    assert value(t, "dropped_items", signal="traces", reason="permanent_error") == 2
    assert value(t, "retries", signal="traces") == 0
