"""HTTP request source, end to end: real BPF program → agent → real Collector → its file output.

A threaded Python ``http.server`` (HTTP/1.1, keep-alive) is called by curl, by ``http.client``
and by raw sockets. Every request must be exactly one SERVER span (this process) and one CLIENT
span (the caller) with the right method, path, status and ports; 20 requests on one keep-alive
connection 20 spans; an incoming traceparent joined; the duration histograms counting every
request; garbage on the server port counted, never a crash. One agent and one Collector serve
the whole module (the program takes seconds to compile); each test has its own server port."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, free_port, wait_until
from .http_support import CLIENT_KIND, ERROR, SERVER_KIND, newest_histogram_points, spans_by_side, wait_spans_by_side

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

CAPTURE = 512
SECRET = "s3cr3t-T0ken-value"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _reply(self, code: int, body: bytes = b"ok") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/missing"):
            self._reply(404, b"not found")   # send_error() would close the connection
        elif path == "/proxy":   # a handler that calls another service on its own thread
            backend = http.client.HTTPConnection("127.0.0.1", BACKEND[0])
            backend.request("GET", "/backend")
            body = backend.getresponse().read()
            backend.close()
            self._reply(200, body)
        elif path == "/boom":
            self._reply(500, b"boom")
        elif path == "/big":
            self._reply(200, b"x" * 100_000)
        elif path == "/sendfile":   # the body by sendfile(2): no user buffer for the program to read
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(__file__)))
            self.end_headers()
            with open(__file__, "rb") as f:
                self.connection.sendfile(f)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._reply(200)

    do_HEAD = do_DELETE = do_GET

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(201, b"created")


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Server:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.httpd = (_Server6 if ":" in host else ThreadingHTTPServer)((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Env:
    def __init__(self, collector: Collector, agent: Agent, ports: dict[str, int],
                 early: http.client.HTTPConnection):
        self.collector, self.agent, self.ports = collector, agent, ports
        self.early = early   # connected before the agent started

    def spans(self, port: int) -> dict[str, list[dict[str, Any]]]:
        """HTTP spans whose server port is ``port``, by side, in start order."""
        return spans_by_side(self.collector, port)

    def wait_spans(self, port: int, n: int) -> dict[str, list[dict[str, Any]]]:
        def details() -> str:
            got = [(k, s["attrs"].get("url.path"), s["attrs"].get("http.response.status_code"))
                   for k, v in self.spans(port).items() for s in v]
            unparsed = {r: self.unparsed(r) for r in ("not_http", "truncated", "unmatched_response",
                                                       "bad_request_line", "bad_status_line")}
            return f"got {got}, unparsed {unparsed}"

        return wait_spans_by_side(lambda: self.spans(port), port, n, details)

    def unparsed(self, reason: str) -> float:
        return self.agent.metric_value("ebpf_receiver_http_unparsed_total", reason=reason)


TESTS = ("curl", "keepalive", "traceparent", "metrics", "garbage", "pipelined", "continue", "ipv6", "early", "proxy",
         "backend")
BACKEND = [0]   # the port /proxy calls


@pytest.fixture(scope="module")
def env(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("http")
    collector = Collector(otelcol_bin, tmp).start()
    ports = {name: free_port() for name in TESTS}
    BACKEND[0] = ports["backend"]
    servers = [Server(p, "::1" if name == "ipv6" else "127.0.0.1") for name, p in ports.items()]
    early = http.client.HTTPConnection("127.0.0.1", ports["early"])
    early.connect()
    # The agent exports over OTLP/HTTP to a port it also watches: the Collector's side of the
    # agent's own requests must never be reported (exporting would feed itself).
    cfg = {"report_interval": "1s", "ports": sorted([*ports.values(), collector.http_port]), "capture_bytes": CAPTURE}
    agent = Agent(tmp, agent_config(collector, {"http": cfg}, exporter={
        "protocol": "http/protobuf", "endpoint": collector.http_endpoint})).start()
    try:
        yield Env(collector, agent, ports, early)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
        assert agent.metric_value("ebpf_receiver_source_events_lost_total", source="http") == 0
        # Nothing the requests carried beyond the named attributes left the host.
        traces = (collector.outdir / "traces.jsonl").read_text()
        assert SECRET not in traces and "Bearer" not in traces and "cookie" not in traces.lower()
        assert not [s for s in collector.spans() if s["attrs"].get("server.port") == collector.http_port
                    or s["resource"].get("process.pid") in (agent.proc.pid, collector.proc.pid)]
    finally:
        early.close()
        for s in servers:
            s.close()
        try:
            assert agent.stop() == 0, agent.log()[-3000:]
        finally:
            collector.stop()


def curl(port: int, path: str, *args: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """Runs curl once (one connection); returns its pid and the status it printed."""
    p = subprocess.Popen(["curl", "-sS", "-g", "-o", "/dev/null", "-w", "%{http_code}", *args,
                          f"http://{host}:{port}{path}"], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    return p.pid, out


def _check_pair(server: dict[str, Any], client: dict[str, Any], method: str, path: str, status: int,
                port: int, address: str = "127.0.0.1") -> None:
    for s in (server, client):
        a = s["attrs"]
        assert s["name"] == method
        assert a["http.request.method"] == method and a["url.path"] == path, a
        assert a["http.response.status_code"] == status and a["url.scheme"] == "http"
        assert a["server.address"] == address and a["server.port"] == port
        assert a["client.address"] == address and a["network.protocol.version"] == "1.1"
        assert int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]) > 0
    assert server["kind"] in SERVER_KIND and client["kind"] in CLIENT_KIND
    assert server["attrs"]["client.port"] == client["attrs"]["client.port"] > 0
    assert server["resource"]["process.pid"] == os.getpid()


def _status_code(span: dict[str, Any]) -> Any:
    return span.get("status", {}).get("code")


def test_curl_requests_one_server_and_one_client_span_each(env: Env) -> None:
    port = env.ports["curl"]
    calls = [("GET", "/ok", 200, ()), ("GET", "/missing/page", 404, ()), ("POST", "/items", 201, ("-d", "a=1")),
             ("GET", "/boom", 500, ()), ("HEAD", "/ok", 200, ("-I",)), ("GET", "/chunked", 200, ()),
             ("GET", "/search", 200, ("-H", f"Authorization: Bearer {SECRET}", "-H", f"Cookie: sid={SECRET}")),
             ("DELETE", "/items/1", 200, ("-X", "DELETE"))]
    pids = []
    for _method, path, status, args in calls:
        query = "?q=" + SECRET if path == "/search" else ""
        pid, code = curl(port, path + query, *args)
        assert int(code) == status
        pids.append(pid)
    spans = env.wait_spans(port, len(calls))
    for (method, path, status, _), pid, server, client in zip(calls, pids, spans["server"], spans["client"]):
        _check_pair(server, client, method, path, status, port)
        assert client["resource"]["process.pid"] == pid
        assert client["resource"]["process.executable.name"] == "curl"
        # error status: 5xx on the server, 4xx and 5xx on the client
        assert (_status_code(server) in ERROR) == (status >= 500), server
        assert (_status_code(client) in ERROR) == (status >= 400), client
        if status >= 400:
            assert client["attrs"]["error.type"] == str(status)
        assert "error.type" not in server["attrs"] or status >= 500


def test_twenty_requests_on_one_keep_alive_connection_are_twenty_spans(env: Env) -> None:
    port = env.ports["keepalive"]
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(20):
        conn.request("GET", f"/ok/{i}?page={i}")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"ok"
    local_port = conn.sock.getsockname()[1]
    conn.close()
    spans = env.wait_spans(port, 20)
    for i, (server, client) in enumerate(zip(spans["server"], spans["client"])):
        _check_pair(server, client, "GET", f"/ok/{i}", 200, port)
        assert client["attrs"]["client.port"] == local_port
        assert client["resource"]["process.pid"] == os.getpid()


def test_incoming_traceparent_makes_the_server_span_a_child_of_the_callers(env: Env) -> None:
    port = env.ports["traceparent"]
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    curl(port, "/traced", "-H", f"traceparent: 00-{trace_id}-{parent}-01")
    curl(port, "/untraced")
    curl(port, "/badly-traced", "-H", "traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01")
    spans = env.wait_spans(port, 3)
    traced, untraced, bad = spans["server"]
    assert traced["attrs"]["url.path"] == "/traced"
    assert traced["traceId"].lower() == trace_id and traced["parentSpanId"].lower() == parent
    assert traced["spanId"].lower() != parent
    for s in (untraced, bad):   # no (valid) traceparent: a new trace, a root span
        assert s["traceId"].lower() != trace_id and not s.get("parentSpanId")
    # The caller's side is in the caller's trace too, a sibling of the server span.
    client = spans["client"][0]
    assert client["traceId"].lower() == trace_id and client["parentSpanId"].lower() == parent


def _histogram_counts(env: Env, name: str, port: int) -> dict[tuple[str, int], int]:
    """(method, status) → count of the newest points of ``name`` for this process and port."""
    out = {}
    for attrs, dp in newest_histogram_points(env.collector, name, port):
        key = (attrs["http.request.method"]["stringValue"], int(attrs["http.response.status_code"]["intValue"]))
        out[key] = int(dp["count"])
        assert "url.path" not in attrs
    return out


def test_duration_histograms_count_every_request(env: Env) -> None:
    port = env.ports["metrics"]
    conn = http.client.HTTPConnection("127.0.0.1", port)
    expected = {("GET", 200): 7, ("GET", 404): 3, ("POST", 201): 2}
    for (method, status), n in expected.items():
        for i in range(n):
            path = f"/missing/{i}" if status == 404 else f"/x/{i}"   # distinct paths, one series
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            r = conn.getresponse()
            r.read()
            assert r.status == status
    conn.close()
    for name in ("http.server.request.duration", "http.client.request.duration"):
        wait_until(lambda name=name: _histogram_counts(env, name, port) == expected, 30, 0.3,
                   f"{name} to count every request")
    hist = next(m for m in env.collector.metrics() if m["name"] == "http.server.request.duration")
    assert hist["histogram"]["aggregationTemporality"] in (2, "AGGREGATION_TEMPORALITY_CUMULATIVE")


def test_garbage_on_the_server_port_is_counted_never_a_crash(env: Env) -> None:
    port = env.ports["garbage"]
    before, tls_before = env.unparsed("not_http"), env.unparsed("tls_unparsed")
    for payload in (bytes(range(256)) * 4, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(500),
                    b"NOT HTTP AT ALL\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(payload + b"\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    # A head larger than the capture: the request line is kept, framing from the next call on.
    big = "x" * (3 * CAPTURE)
    _pid, code = curl(port, "/after-garbage", "-H", f"X-Padding: {big}")
    assert code == "200"
    # The second looks like a TLS ClientHello: never parsed as HTTP, counted at each end as TLS
    # whose plaintext no uprobe saw (nothing on this socket called OpenSSL).
    wait_until(lambda: env.unparsed("not_http") >= before + 2, 20, 0.2, "garbage counted as not_http")
    wait_until(lambda: env.unparsed("tls_unparsed") >= tls_before + 2, 20, 0.2, "TLS bytes counted")
    spans = env.wait_spans(port, 1)
    _check_pair(spans["server"][0], spans["client"][0], "GET", "/after-garbage", 200, port)
    assert env.unparsed("truncated") >= 1
    assert env.unparsed("tls_unparsed") == tls_before + 2   # both ends of it are in this process
    assert env.agent.metric_value("ebpf_receiver_source_events_lost_total", source="http",
                                  reason="decode_error") == 0


def test_pipelined_and_split_requests_through_every_call(env: Env) -> None:
    """Three requests in one write (pipelined), then one split over write, writev (two iovecs)
    and sendmsg, then one by sendto; the responses read with read, readv, recvmsg and recvfrom
    in turn. The server answers in order (recvfrom/sendto)."""
    port = env.ports["pipelined"]
    with socket.create_connection(("127.0.0.1", port)) as s:
        fd = s.fileno()
        os.write(fd, b"GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /missing/p2 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /p/3 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        time.sleep(0.05)
        os.write(fd, b"GET /p/4 HT")
        time.sleep(0.05)
        os.writev(fd, [b"TP/1.1\r\n", b"Host: x\r\n"])
        time.sleep(0.05)
        s.sendmsg([b"\r", b"\n"])
        s.sendto(b"HEAD /p/5 HTTP/1.1\r\n\r\n", ("127.0.0.1", port))
        got = b""
        reads = [lambda: os.read(fd, 65536), lambda: _readv(fd), lambda: s.recvmsg(65536)[0], lambda: s.recv(65536)]
        i = 0
        while got.count(b"HTTP/1.1 ") < 5:
            chunk = reads[i % len(reads)]()
            i += 1
            assert chunk, got
            got += chunk
    spans = env.wait_spans(port, 5)
    for (method, path, status), server, client in zip(
            [("GET", "/p/1", 200), ("GET", "/missing/p2", 404), ("POST", "/p/3", 201), ("GET", "/p/4", 200),
             ("HEAD", "/p/5", 200)], spans["server"], spans["client"]):
        _check_pair(server, client, method, path, status, port)


def _readv(fd: int) -> bytes:
    a, b = bytearray(40), bytearray(65536)
    n = os.readv(fd, [a, b])
    return bytes((a + b)[:n])


def test_100_continue_sendfile_and_a_big_response(env: Env) -> None:
    port = env.ports["continue"]
    p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue",
                        "--data-binary", "@-", f"http://127.0.0.1:{port}/upload"],
                       input=json.dumps({"k": "v" * 5000}).encode(), capture_output=True, timeout=30, check=True)
    assert p.stdout == b"201"
    curl(port, "/big")
    conn = http.client.HTTPConnection("127.0.0.1", port)   # keep-alive: framing must survive sendfile
    for path in ("/sendfile", "/ok", "/sendfile", "/missing/after-sendfile"):
        conn.request("GET", path)
        conn.getresponse().read()
    conn.close()
    spans = env.wait_spans(port, 6)
    expected = [("POST", "/upload", 201), ("GET", "/big", 200), ("GET", "/sendfile", 200), ("GET", "/ok", 200),
                ("GET", "/sendfile", 200), ("GET", "/missing/after-sendfile", 404)]
    for (method, path, status), server, client in zip(expected, spans["server"], spans["client"]):
        _check_pair(server, client, method, path, status, port)


def test_ipv6(env: Env) -> None:
    port = env.ports["ipv6"]
    curl(port, "/v6", host="[::1]")
    conn = http.client.HTTPConnection("::1", port)
    conn.request("GET", "/missing/v6")
    assert conn.getresponse().status == 404
    conn.close()
    spans = env.wait_spans(port, 2)
    _check_pair(spans["server"][0], spans["client"][0], "GET", "/v6", 200, port, "::1")
    _check_pair(spans["server"][1], spans["client"][1], "GET", "/missing/v6", 404, port, "::1")


def test_connection_older_than_the_agent_is_picked_up_by_its_first_bytes(env: Env) -> None:
    """Connected before the program was attached: no state change was seen, so the endpoints come
    from /proc. The server's handler thread was already blocked in its first receive then (a call
    whose start the program did not see), so the first request has only its CLIENT span; its
    response is counted as unmatched."""
    port = env.ports["early"]
    unmatched = env.unparsed("unmatched_response")
    local_port = env.early.sock.getsockname()[1]
    for i in range(4):
        env.early.request("GET", f"/early/{i}")
        r = env.early.getresponse()
        assert r.status == 200 and r.read() == b"ok"
    wait_until(lambda: len(env.spans(port)["client"]) == 4 and len(env.spans(port)["server"]) == 3, 30, 0.2,
               "4 client and 3 server spans")
    time.sleep(1.0)
    spans = env.spans(port)
    assert [s["attrs"]["url.path"] for s in spans["client"]] == [f"/early/{i}" for i in range(4)]
    assert [s["attrs"]["url.path"] for s in spans["server"]] == [f"/early/{i}" for i in range(1, 4)]
    for server, client in zip(spans["server"], spans["client"][1:]):
        _check_pair(server, client, "GET", server["attrs"]["url.path"], 200, port)
        assert client["attrs"]["client.port"] == local_port
    assert env.unparsed("unmatched_response") == unmatched + 1


def test_a_request_made_while_serving_one_is_its_child(env: Env) -> None:
    """A thread-per-request handler calls another service: the CLIENT span of that call is a
    child of the SERVER span the thread was serving, in its trace (the caller's, when the
    incoming request carried a traceparent)."""
    port, backend = env.ports["proxy"], env.ports["backend"]
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    curl(port, "/proxy")
    curl(port, "/proxy", "-H", f"traceparent: 00-{trace_id}-{parent}-01")
    front = env.wait_spans(port, 2)
    back = env.wait_spans(backend, 2)
    for server, call in zip(front["server"], back["client"]):
        assert server["attrs"]["url.path"] == "/proxy" and call["attrs"]["url.path"] == "/backend"
        assert call["resource"]["process.pid"] == os.getpid() and call["kind"] in CLIENT_KIND
        assert call["traceId"] == server["traceId"] and call["parentSpanId"] == server["spanId"]
        assert int(server["startTimeUnixNano"]) <= int(call["startTimeUnixNano"])
        assert int(call["endTimeUnixNano"]) <= int(server["endTimeUnixNano"])
    untraced, traced = front["server"]
    assert not untraced.get("parentSpanId")
    assert traced["traceId"].lower() == trace_id and traced["parentSpanId"].lower() == parent
    # the backend's own SERVER spans and curl's CLIENT spans are not children of anything served
    for s in back["server"] + front["client"][:1]:
        assert not s.get("parentSpanId"), s
