"""Streaming gRPC calls through the http source, end to end: real BPF program → agent → real
Collector → its file output.

A real grpcio server and client (this process) make server-streaming, client-streaming and
bidirectional calls, many messages each way on one channel: every call must be one SERVER and one
CLIENT span named ``{rpc.service}/{rpc.method}``, lasting from the request's HEADERS to the
response's trailers (messages spread over half a second lie inside it), with the status from
the trailers: OK, and an error status sent after some messages. The call-duration histograms
count every call."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from ..harness import Agent, Collector, agent_config, free_port, wait_until
from .http_support import CLIENT_KIND, ERROR, SERVER_KIND, newest_histogram_points, spans_by_side, wait_spans_by_side

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

CAPTURE = 8192
SERVICE = "demo.v1.Streamer"
MESSAGES = 50          # per streaming direction of a call
SLOW = 0.5             # seconds the Slow calls spread their messages over


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"item %d" % i


def _server_stream_fails(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"item %d" % i
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no more items")


def _slow_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(5):
        time.sleep(SLOW / 4 if i else 0)
        yield b"slow %d" % i


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(1 for _ in requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield b"echo " + r


def _bidi_fails(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for i, r in enumerate(requests):
        if i == 10:
            context.abort(grpc.StatusCode.ABORTED, "enough")
        yield b"echo " + r


def grpc_server(port: int) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    handlers = {
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ServerStreamFails": grpc.unary_stream_rpc_method_handler(_server_stream_fails),
        "Slow": grpc.unary_stream_rpc_method_handler(_slow_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "BidiFails": grpc.stream_stream_rpc_method_handler(_bidi_fails),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


class Env:
    def __init__(self, collector: Collector, agent: Agent, port: int):
        self.collector, self.agent, self.port = collector, agent, port

    def spans(self) -> dict[str, list[dict[str, Any]]]:
        return spans_by_side(self.collector, self.port, lambda a: "rpc.system" in a)

    def unparsed(self) -> dict[str, float]:
        out = {}
        for line in self.agent.scrape().splitlines():
            if line.startswith("ebpf_receiver_http_unparsed_total{") and not line.endswith(" 0.0"):
                out[line.split('reason="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture(scope="module")
def env(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("grpc-streaming")
    collector = Collector(otelcol_bin, tmp).start()
    port = free_port()
    server = grpc_server(port)
    cfg = {"report_interval": "1s", "ports": [port], "capture_bytes": CAPTURE}
    agent = Agent(tmp, agent_config(collector, {"http": cfg})).start()
    try:
        yield Env(collector, agent, port)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
        assert agent.metric_value("ebpf_receiver_source_events_lost_total", source="http") == 0
    finally:
        server.stop(None)
        try:
            assert agent.stop() == 0, agent.log()[-3000:]
        finally:
            collector.stop()


def _paced(n: int) -> Iterator[bytes]:
    """``n`` request messages, each written once the one before left (so that gRPC does not
    coalesce them into one write of more iovecs than the program reads; see docs/sources.md)."""
    for i in range(n):
        if i:
            time.sleep(0.002)
        yield b"msg %d" % i


def _drain(responses: Iterator[bytes]) -> tuple[str, int]:
    """The status code of a streaming call and how many messages came before it."""
    n = 0
    try:
        for _ in responses:
            n += 1
        return "OK", n
    except grpc.RpcError as e:
        return e.code().name, n


# (method, gRPC status code) of every call, in order, and what each returns
CALLS = [("ServerStream", 0), ("ClientStream", 0), ("Bidi", 0), ("ServerStreamFails", 8), ("BidiFails", 10),
         ("Slow", 0), ("ServerStream", 0), ("ClientStream", 0), ("Bidi", 0)]


def _run_calls(channel: grpc.Channel) -> None:
    def stub(kind: str, method: str) -> Any:
        return getattr(channel, kind)(f"/{SERVICE}/{method}")

    for method, _status in CALLS:
        if method == "ServerStream":
            got = list(stub("unary_stream", method)(b"%d" % MESSAGES, timeout=30))
            assert got == [b"item %d" % i for i in range(MESSAGES)]
        elif method == "ServerStreamFails":
            assert _drain(stub("unary_stream", method)(b"3", timeout=30)) == ("RESOURCE_EXHAUSTED", 3)
        elif method == "Slow":
            assert len(list(stub("unary_stream", method)(b"", timeout=30))) == 5
        elif method == "ClientStream":
            assert stub("stream_unary", method)(_paced(MESSAGES), timeout=30) == b"%d" % MESSAGES
        elif method == "Bidi":
            got = list(stub("stream_stream", method)(_paced(MESSAGES), timeout=30))
            assert got == [b"echo msg %d" % i for i in range(MESSAGES)]
        else:
            assert _drain(stub("stream_stream", method)(_paced(MESSAGES), timeout=30)) == ("ABORTED", 10)


def test_streaming_calls_are_one_server_and_one_client_span_each_with_the_trailers_status(env: Env) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{env.port}") as channel:
        _run_calls(channel)

    def details() -> str:
        return f"got { {k: len(v) for k, v in env.spans().items()} }, unparsed {env.unparsed()}"

    spans = wait_spans_by_side(env.spans, env.port, len(CALLS), details, 60, 0.3, 1.5)
    for side, kind in (("server", SERVER_KIND), ("client", CLIENT_KIND)):
        got = [(s["attrs"]["rpc.method"], s["attrs"].get("rpc.grpc.status_code")) for s in spans[side]]
        assert got == CALLS, (side, got)
        for s in spans[side]:
            a = s["attrs"]
            assert s["kind"] in kind and s["name"] == f"{SERVICE}/{a['rpc.method']}"
            assert a["rpc.system"] == "grpc" and a["rpc.service"] == SERVICE and a["server.port"] == env.port
            assert a["network.protocol.version"] == "2" and s["resource"]["process.pid"] == os.getpid()
            # an error status is the caller's error; RESOURCE_EXHAUSTED and ABORTED are not the server's
            assert (s.get("status", {}).get("code") in ERROR) == (side == "client" and a["rpc.grpc.status_code"] != 0)
        slow = next(s for s in spans[side] if s["attrs"]["rpc.method"] == "Slow")
        # from the request's HEADERS to the trailers: its messages, spread over SLOW, lie inside
        assert int(slow["endTimeUnixNano"]) - int(slow["startTimeUnixNano"]) >= SLOW * 0.9e9
    assert len({s["attrs"]["client.port"] for v in spans.values() for s in v}) == 1   # one channel
    assert not {k for k in env.unparsed() if k.startswith("h2_") or k in ("truncated", "lost_data")}, env.unparsed()

    expected: dict[tuple[str, int], int] = {}
    for key in CALLS:
        expected[key] = expected.get(key, 0) + 1

    def counts(name: str) -> dict[tuple[str, int], int]:
        return {(a["rpc.method"]["stringValue"], int(a["rpc.grpc.status_code"]["intValue"])): int(dp["count"])
                for a, dp in newest_histogram_points(env.collector, name, env.port)}

    for name in ("rpc.server.call.duration", "rpc.client.call.duration"):
        wait_until(lambda name=name: counts(name) == expected, 60, 0.3, f"{name} to count every streaming call")
