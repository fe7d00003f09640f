"""HTTP/2 and gRPC through the http source, end to end: real BPF program → agent → real
Collector → its file output.

A real grpcio server and client (unary calls on one channel, from this process) must give one
SERVER and one CLIENT span per call, named ``{rpc.service}/{rpc.method}`` with the gRPC status
from the trailers; 100 calls on one channel 100 spans; concurrent calls (interleaved streams)
each their own; the ``rpc.*.call.duration`` histograms counting every call. A real HTTP/2 server
(Go's net/http with golang.org/x/net/http2/h2c) called by curl ``--http2-prior-knowledge`` and by
curl ``--http2`` (HTTP/1.1 Upgrade: h2c) gives HTTP spans with ``network.protocol.version`` 2.
One agent and one Collector serve the whole module."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from ..harness import Agent, Collector, agent_config, fail_or_skip, free_port, go_env, wait_until
from .http_support import (
    CLIENT_KIND,
    ERROR,
    SERVER_KIND,
    newest_histogram_points,
    self_signed_cert,
    spans_by_side,
    wait_listening,
    wait_spans_by_side,
)

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

CAPTURE = 8192
SERVICE = "demo.v1.Greeter"
TESTS = ("unary", "hundred", "concurrent", "metrics", "h2c", "upgrade", "early", "h2tls")
X_NET = "v0.38.0"   # golang.org/x/net for the h2c server (Go >= 1.23)
NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx-h2.pid;
error_log {tmp}/nginx-h2-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        location /missing {{ return 404 "no\\n"; }}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

GO_SERVER = """package main

import (
	"fmt"
	"net/http"
	"os"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/missing":
			w.WriteHeader(404)
		case r.Method == "DELETE":
			w.WriteHeader(201)
		}
		fmt.Fprint(w, "ok ", r.Proto)
	})
	// unencrypted HTTP/2 both ways: prior knowledge (the preface) and HTTP/1.1 Upgrade: h2c
	s := &http.Server{Addr: "127.0.0.1:" + os.Args[1], Handler: h2c.NewHandler(mux, &http2.Server{})}
	fmt.Println(s.ListenAndServe())
}
"""


def _say_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"hello " + request


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
    raise AssertionError("abort returns no value")


def _crash(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.INTERNAL, "boom")
    raise AssertionError("abort returns no value")


_HELD: list[threading.Event] = []


def _held(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Holds its stream open until the test releases it."""
    ev = threading.Event()
    _HELD.append(ev)
    ev.wait(30)
    return request


def grpc_server(port: int) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=24))
    handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in
                (("SayHello", _say_hello), ("Fail", _fail), ("Crash", _crash), ("Held", _held),
                 ("Fresh", _say_hello))}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


class Env:
    def __init__(self, collector: Collector, agent: Agent, ports: dict[str, int], h2c_pid: int,
                 early: grpc.Channel, nginx_pid: int | None, upgrade_pid: int):
        self.collector, self.agent, self.ports, self.h2c_pid = collector, agent, ports, h2c_pid
        self.upgrade_pid = upgrade_pid   # the same h2c server, for curl --http2 (Upgrade: h2c)
        self.nginx_pid = nginx_pid   # nginx with OpenSSL serving h2 over TLS (None: not installed)
        self.early = early   # connected (and used) before the agent started

    def spans(self, port: int, rpc: bool = True) -> dict[str, list[dict[str, Any]]]:
        """gRPC (or HTTP) spans whose server port is ``port``, by side, in start order."""
        return spans_by_side(self.collector, port, lambda a: ("rpc.system" in a) == rpc)

    def wait_spans(self, port: int, n: int, rpc: bool = True) -> dict[str, list[dict[str, Any]]]:
        def details() -> str:
            return f"got { {k: len(v) for k, v in self.spans(port, rpc).items()} }, unparsed {self.unparsed()}"

        return wait_spans_by_side(lambda: self.spans(port, rpc), port, n, details, 60, 0.3, 1.5)

    def unparsed(self) -> dict[str, float]:
        text = self.agent.scrape()
        out = {}
        for line in text.splitlines():
            if line.startswith("ebpf_receiver_http_unparsed_total{") and not line.endswith(" 0.0"):
                out[line.split('reason="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        return out


def _build_go_server(tmp: Path) -> Path:
    """The h2c server (golang.org/x/net from the Go module proxy)."""
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go") else None)
    if go is None:
        fail_or_skip("no Go toolchain for the HTTP/2 server (net/http with x/net/http2/h2c)")
    src = tmp / "h2c"
    src.mkdir()
    (src / "main.go").write_text(GO_SERVER)
    (src / "go.mod").write_text(f"module h2c\n\ngo 1.23\n\nrequire golang.org/x/net {X_NET}\n")
    subprocess.run([str(go), "build", "-o", "h2c-server", "."], cwd=src, env={**go_env(tmp), "CGO_ENABLED": "0"},
                   check=True, timeout=600, capture_output=True)
    return src / "h2c-server"


def _start_nginx(tmp: Path, port: int) -> subprocess.Popen[bytes] | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return None
    self_signed_cert(tmp / "key.pem", tmp / "cert.pem")
    (tmp / "nginx-h2.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
    proc = subprocess.Popen([nginx, "-c", str(tmp / "nginx-h2.conf"), "-e", str(tmp / "nginx-h2-error.log")],
                            stdin=subprocess.DEVNULL)
    wait_listening(port, "nginx listening")
    return proc


@pytest.fixture(scope="module")
def env(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("grpc")
    h2c_bin = _build_go_server(tmp)
    collector = Collector(otelcol_bin, tmp).start()
    ports = {name: free_port() for name in TESTS}
    servers = [grpc_server(p) for name, p in ports.items() if name not in ("h2c", "upgrade", "h2tls")]
    h2c = subprocess.Popen([str(h2c_bin), str(ports["h2c"])], stdout=subprocess.DEVNULL)
    upgrade = subprocess.Popen([str(h2c_bin), str(ports["upgrade"])], stdout=subprocess.DEVNULL)
    wait_listening(ports["upgrade"], "the h2c server listening")
    nginx = _start_nginx(tmp, ports["h2tls"])
    early = grpc.insecure_channel(f"127.0.0.1:{ports['early']}")
    assert _call(early, "SayHello") == ("OK", b"hello world")
    cfg = {"report_interval": "1s", "ports": sorted(ports.values()), "capture_bytes": CAPTURE}
    agent = Agent(tmp, agent_config(collector, {"http": cfg})).start()
    try:
        yield Env(collector, agent, ports, h2c.pid, early, nginx.pid if nginx else None, upgrade.pid)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
        assert agent.metric_value("ebpf_receiver_source_events_lost_total", source="http") == 0
    finally:
        early.close()
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for p in (h2c, upgrade):
            p.kill()
            p.wait()
        for s in servers:
            s.stop(None)
        try:
            assert agent.stop() == 0, agent.log()[-3000:]
        finally:
            collector.stop()


def _call(channel: grpc.Channel, method: str, body: bytes = b"world", **kw: Any) -> tuple[str, bytes]:
    stub = channel.unary_unary(f"/{SERVICE}/{method}")
    try:
        return "OK", stub(body, timeout=10, **kw)
    except grpc.RpcError as e:
        return e.code().name, b""


def _check_pair(server: dict[str, Any], client: dict[str, Any], method: str, status: int, port: int) -> None:
    for s in (server, client):
        a = s["attrs"]
        assert s["name"] == f"{SERVICE}/{method}", s["name"]
        assert a["rpc.system"] == "grpc" and a["rpc.service"] == SERVICE and a["rpc.method"] == method, a
        assert a["rpc.grpc.status_code"] == status, a
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == port
        assert a["network.protocol.version"] == "2" and "http.request.method" not in a
        assert int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]) > 0
    assert server["kind"] in SERVER_KIND and client["kind"] in CLIENT_KIND
    assert server["attrs"]["client.port"] == client["attrs"]["client.port"] > 0
    assert server["resource"]["process.pid"] == client["resource"]["process.pid"] == os.getpid()


def _status(span: dict[str, Any]) -> Any:
    return span.get("status", {}).get("code")


def test_unary_calls_one_server_and_one_client_span_each_with_the_status_from_the_trailers(env: Env) -> None:
    port = env.ports["unary"]
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    calls = [("SayHello", "OK", 0), ("Fail", "NOT_FOUND", 5), ("SayHello", "OK", 0), ("Crash", "INTERNAL", 13)]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method, code, _ in calls:
            assert _call(channel, method)[0] == code
        assert _call(channel, "SayHello", metadata=(("traceparent", tp),)) == ("OK", b"hello world")
    spans = env.wait_spans(port, len(calls) + 1)
    for (method, _code, status), server, client in zip(calls, spans["server"], spans["client"]):
        _check_pair(server, client, method, status, port)
    by = {(s["attrs"]["rpc.method"], s["kind"] in SERVER_KIND): s for v in spans.values() for s in v}
    # errors per side: NOT_FOUND is the caller's error only; INTERNAL both sides'
    assert _status(by[("Fail", False)]) in ERROR and _status(by[("Fail", True)]) not in ERROR
    assert by[("Fail", False)]["attrs"]["error.type"] == "5" and "error.type" not in by[("Fail", True)]["attrs"]
    assert _status(by[("Crash", True)]) in ERROR and _status(by[("Crash", False)]) in ERROR
    assert all(_status(s) not in ERROR for v in spans.values() for s in v if s["attrs"]["rpc.method"] == "SayHello")
    joined = spans["server"][-1]
    assert joined["traceId"].lower() == tp[3:35] and joined["parentSpanId"].lower() == tp[36:52]


def test_a_hundred_calls_on_one_channel_are_a_hundred_spans(env: Env) -> None:
    port = env.ports["hundred"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for i in range(100):
            assert _call(channel, "SayHello", str(i).encode()) == ("OK", b"hello " + str(i).encode())
    spans = env.wait_spans(port, 100)
    for server, client in zip(spans["server"], spans["client"]):
        _check_pair(server, client, "SayHello", 0, port)
    assert len({s["attrs"]["client.port"] for v in spans.values() for s in v}) == 1   # one connection


def test_concurrent_calls_interleave_their_streams_and_each_is_a_span(env: Env) -> None:
    """Ten Held calls stay open while ten SayHello calls come and go on the same connection; the
    Held ones are then answered in reverse order. Each call is started once the previous one
    reached the server, and each answer once the previous one arrived: so every write carries one
    call (a write of many coalesced calls has more iovecs than the program reads, see
    docs/sources.md) while the streams interleave."""
    port = env.ports["concurrent"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        held, hello = channel.unary_unary(f"/{SERVICE}/Held"), channel.unary_unary(f"/{SERVICE}/SayHello")
        futures = []
        for i in range(10):
            futures.append(held.future(b"h%d" % i, timeout=30))
            wait_until(lambda i=i: len(_HELD) == i + 1, 10, 0.01, "the held call to reach the server")
            assert hello(b"s%d" % i, timeout=10) == b"hello s%d" % i
        for i in reversed(range(10)):
            _HELD[i].set()
            assert futures[i].result() == b"h%d" % i
    _HELD.clear()
    spans = env.wait_spans(port, 20)
    for side in ("server", "client"):
        assert sorted(s["attrs"]["rpc.method"] for s in spans[side]) == ["Held"] * 10 + ["SayHello"] * 10
        assert all(s["attrs"]["rpc.grpc.status_code"] == 0 for s in spans[side])
    held_spans = [s for s in spans["server"] if s["attrs"]["rpc.method"] == "Held"]
    first = held_spans[0]   # open from the first call to the last answer
    assert all(int(first["startTimeUnixNano"]) < int(s["startTimeUnixNano"]) < int(first["endTimeUnixNano"])
               for s in spans["server"] if s is not first)
    assert len({s["attrs"]["client.port"] for v in spans.values() for s in v}) == 1


def _histogram_counts(env: Env, name: str, port: int) -> dict[tuple[str, int], int]:
    out = {}
    for attrs, dp in newest_histogram_points(env.collector, name, port):
        assert attrs["rpc.system"]["stringValue"] == "grpc"
        assert attrs["rpc.service"]["stringValue"] == SERVICE
        key = (attrs["rpc.method"]["stringValue"], int(attrs["rpc.grpc.status_code"]["intValue"]))
        out[key] = int(dp["count"])
    return out


def test_call_duration_histograms_count_every_call(env: Env) -> None:
    port = env.ports["metrics"]
    expected = {("SayHello", 0): 7, ("Fail", 5): 3, ("Crash", 13): 2}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for (method, _status), n in expected.items():
            for _ in range(n):
                _call(channel, method)
    for name in ("rpc.server.call.duration", "rpc.client.call.duration"):
        wait_until(lambda name=name: _histogram_counts(env, name, port) == expected, 60, 0.3,
                   f"{name} to count every call")
    hist = next(m for m in env.collector.metrics() if m["name"] == "rpc.server.call.duration")
    assert hist["histogram"]["aggregationTemporality"] in (2, "AGGREGATION_TEMPORALITY_CUMULATIVE")


def _curl(port: int, path: str, *args: str) -> tuple[int, str]:
    p = subprocess.Popen(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                          "%{http_code} %{http_version}", *args, f"http://127.0.0.1:{port}{path}"],
                         stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    return p.pid, out


def test_curl_http2_prior_knowledge_requests_are_http_spans_with_version_2(env: Env) -> None:
    port = env.ports["h2c"]
    # (no POST with a body: curl 7.88 and Go's server disagree on it now and then, agent or not)
    calls = [("GET", "/ok", 200, ()), ("GET", "/missing", 404, ()), ("DELETE", "/items", 201, ("-X", "DELETE")),
             ("GET", "/q", 200, ("-H", "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))]
    pids = []
    for _method, path, status, args in calls:
        pid, out = _curl(port, path + "?secret=1", *args)
        assert out == f"{status} 2", out
        pids.append(pid)
    spans = env.wait_spans(port, len(calls), rpc=False)
    for (method, path, status, _), pid, server, client in zip(calls, pids, spans["server"], spans["client"]):
        for s in (server, client):
            a = s["attrs"]
            assert s["name"] == method and a["http.request.method"] == method and a["url.path"] == path, a
            assert a["http.response.status_code"] == status and a["network.protocol.version"] == "2"
            assert a["server.port"] == port and a["url.scheme"] == "http" and "rpc.system" not in a
        assert server["resource"]["process.pid"] == env.h2c_pid and client["resource"]["process.pid"] == pid
        assert server["kind"] in SERVER_KIND and client["kind"] in CLIENT_KIND
        assert server["attrs"]["client.port"] == client["attrs"]["client.port"]
    assert spans["server"][3]["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert _status(spans["server"][1]) not in ERROR and _status(spans["client"][1]) in ERROR


def test_curl_http2_upgrades_to_h2c_and_each_request_is_one_http2_span(env: Env) -> None:
    """curl --http2 on an http:// URL sends HTTP/1.1 with Upgrade: h2c; the server answers 101
    and stream 1's response in HTTP/2. One curl with two URLs: the second request is stream 3 on
    the upgraded connection. Every request is one SERVER and one CLIENT span, version 2."""
    port = env.ports["upgrade"]
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    runs = [(["/ok"], ()), (["/missing"], ()), (["/traced"], ("-H", f"traceparent: {tp}")), (["/one", "/two"], ())]
    expected, pids = [], []
    for paths, args in runs:
        p = subprocess.Popen(["curl", "-sS", "--http2", *args, *(x for path in paths for x in (
            "-o", "/dev/null", "-w", "%{http_code} %{http_version}\n", f"http://127.0.0.1:{port}{path}?q=1"))],
            stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=30)
        statuses = [404 if path == "/missing" else 200 for path in paths]
        assert p.returncode == 0 and out.split("\n")[:-1] == [f"{s} 2" for s in statuses], out
        expected += list(zip(paths, statuses))
        pids += [p.pid] * len(paths)
    spans = env.wait_spans(port, len(expected), rpc=False)
    for (path, status), pid, server, client in zip(expected, pids, spans["server"], spans["client"]):
        for s in (server, client):
            a = s["attrs"]
            assert s["name"] == "GET" and a["url.path"] == path and a["http.response.status_code"] == status, a
            assert a["network.protocol.version"] == "2" and a["url.scheme"] == "http" and a["server.port"] == port
        assert server["resource"]["process.pid"] == env.upgrade_pid and client["resource"]["process.pid"] == pid
        assert server["kind"] in SERVER_KIND and client["kind"] in CLIENT_KIND
        assert server["attrs"]["client.port"] == client["attrs"]["client.port"]
    traced = spans["server"][2]
    assert traced["traceId"].lower() == tp[3:35] and traced["parentSpanId"].lower() == tp[36:52]
    assert spans["server"][3]["attrs"]["client.port"] == spans["server"][4]["attrs"]["client.port"]
    assert _status(spans["client"][1]) in ERROR


def test_a_channel_connected_before_the_agent_is_found_mid_way_and_never_misnamed(env: Env) -> None:
    """The channel's connection and both HPACK tables are older than the agent: a call to the
    method used before refers to table entries the agent never saw and is counted, not named; a
    method new to the channel has its path as a literal and is named (a gRPC call by its message
    framing), its status left out where the trailers refer to unknown entries."""
    port = env.ports["early"]
    before = env.unparsed()
    for _ in range(3):
        assert _call(env.early, "SayHello") == ("OK", b"hello world")
    assert _call(env.early, "Fresh") == ("OK", b"hello world")
    spans = env.wait_spans(port, 1)
    for s in (spans["server"][0], spans["client"][0]):
        a = s["attrs"]
        assert s["name"] == f"{SERVICE}/Fresh" and a["rpc.method"] == "Fresh" and a["rpc.system"] == "grpc", a
        assert a.get("rpc.grpc.status_code", 0) == 0 and a["server.port"] == port
    assert spans["server"][0]["attrs"]["client.port"] == spans["client"][0]["attrs"]["client.port"]
    after = env.unparsed()
    assert after.get("h2_midway", 0) - before.get("h2_midway", 0) == 2   # one per side
    assert after.get("h2_unknown_index", 0) - before.get("h2_unknown_index", 0) >= 6   # 3 calls, 2 sides


def test_h2_over_tls_through_the_openssl_uprobes(env: Env) -> None:
    """curl --http2 to nginx over TLS (ALPN h2), both on the system's OpenSSL 3: the uprobes hand
    the plaintext (it starts with the preface) to the same HTTP/2 parser."""
    if env.nginx_pid is None:
        fail_or_skip("nginx is not installed (apt-get install nginx-light)")
    port = env.ports["h2tls"]
    calls = [("/ok", 200), ("/missing", 404), ("/again", 200)]
    pids = []
    for path, status in calls:
        p = subprocess.Popen(["curl", "-sS", "-k", "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                              f"https://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0 and out == f"{status} 2", (out, err)
        pids.append(p.pid)
    spans = env.wait_spans(port, len(calls), rpc=False)
    for (path, status), pid, server, client in zip(calls, pids, spans["server"], spans["client"]):
        for s in (server, client):
            a = s["attrs"]
            assert a["url.path"] == path and a["http.response.status_code"] == status, a
            assert a["url.scheme"] == "https" and a["network.protocol.version"] == "2"
        assert server["resource"]["process.pid"] == env.nginx_pid and client["resource"]["process.pid"] == pid
