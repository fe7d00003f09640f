"""HTTP over TLS, end to end: uprobes on the system's OpenSSL 3 libssl → agent → real Collector.

Servers: a threaded Python ``http.server`` behind ``ssl`` and nginx with OpenSSL (a self-signed
certificate made here with ``openssl``). Clients: curl and Python's ``http.client``. Every
request must be exactly one SERVER and one CLIENT span with ``url.scheme`` https and the right
method, path, status and ports; 20 requests on one keep-alive TLS connection 20 spans; a
traceparent joined. A Go client (crypto/tls, which no uprobe sees) is counted as
``tls_unparsed`` and gives no spans."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, fail_or_skip, free_port, go_env, wait_until
from .http_support import (
    CLIENT_KIND,
    ERROR,
    SERVER_KIND,
    self_signed_cert,
    spans_by_side,
    wait_listening,
    wait_spans_by_side,
)
from .test_http_e2e import SECRET, Handler

pytestmark = [pytest.mark.bpf, pytest.mark.collector, pytest.mark.host]

TESTS = ("curl", "keepalive", "traceparent", "nginx", "go", "late")


def _cert(tmp: Path) -> tuple[Path, Path]:
    key, crt = tmp / "key.pem", tmp / "cert.pem"
    self_signed_cert(key, crt)
    return key, crt


class TlsServer:
    """The HTTP/1.1 handler of the plaintext tests, behind Python's ssl (the handshake runs in
    accept(); requests are read and answered with SSL_read_ex/SSL_write_ex on the socket)."""

    def __init__(self, port: int, key: Path, crt: Path):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        location /missing {{ return 404 "no\\n"; }}
        location /boom {{ return 500 "boom\\n"; }}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def start_nginx(tmp: Path, port: int, key: Path, crt: Path, tls: bool = True) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        fail_or_skip("nginx is not installed (apt-get install nginx-light)")
    conf = NGINX_CONF.format(tmp=tmp, port=port, crt=crt, key=key)
    if not tls:
        conf = "\n".join(line for line in conf.replace(" ssl;", ";").splitlines() if "ssl_certificate" not in line)
    (tmp / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([str(nginx), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")],
                            stdin=subprocess.DEVNULL)
    wait_listening(port, "nginx listening")
    return proc


class Env:
    def __init__(self, collector: Collector, agent: Agent, ports: dict[str, int], nginx: subprocess.Popen[bytes],
                 tmp: Path, key: Path, crt: Path):
        self.collector, self.agent, self.ports, self.nginx, self.tmp = collector, agent, ports, nginx, tmp
        self.key, self.crt = key, crt

    def spans(self, port: int) -> dict[str, list[dict[str, Any]]]:
        return spans_by_side(self.collector, port)

    def wait_spans(self, port: int, n: int) -> dict[str, list[dict[str, Any]]]:
        def details() -> str:
            got = {k: [s["attrs"].get("url.path") for s in v] for k, v in self.spans(port).items()}
            return f"got {got}; agent log: {self.agent.log()[-2000:]}"

        return wait_spans_by_side(lambda: self.spans(port), port, n, details)

    def unparsed(self, reason: str) -> float:
        return self.agent.metric_value("ebpf_receiver_http_unparsed_total", reason=reason)


@pytest.fixture(scope="module")
def env(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("https")
    key, crt = _cert(tmp)
    collector = Collector(otelcol_bin, tmp).start()
    ports = {name: free_port() for name in TESTS}
    servers = [TlsServer(p, key, crt) for name, p in ports.items() if name not in ("nginx", "late")]
    nginx = start_nginx(tmp, ports["nginx"], key, crt)
    # capture_bytes as configured by default: with 1024, an SSL_read returning -1 (a non-blocking
    # socket with nothing to read) once became a 4 GiB read of garbage.
    cfg = {"report_interval": "1s", "ports": sorted(ports.values()),
           "keep_sys_admin_for_tls": True}   # test_a_libssl_first_mapped_after_start_is_probed
    agent = Agent(tmp, agent_config(collector, {"http": cfg}, exporter={
        "protocol": "http/protobuf", "endpoint": collector.http_endpoint}))
    try:
        agent.start()
        # the system's libssl is mapped by this process (ssl) and nginx: probed at start
        wait_until(lambda: "TLS uprobes on" in agent.log(), 30, 0.2, "TLS uprobes attached")
        yield Env(collector, agent, ports, nginx, tmp, key, crt)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
        assert agent.metric_value("ebpf_receiver_source_events_lost_total", source="http") == 0
        # Every byte the uprobes reported parsed: only the Go client's connections are unparsed.
        from prometheus_client.parser import text_string_to_metric_families
        unparsed = {s.labels["reason"]: s.value for f in text_string_to_metric_families(agent.scrape())
                    for s in f.samples if s.name == "ebpf_receiver_http_unparsed_total" and s.value}
        assert set(unparsed) <= {"tls_unparsed"}, unparsed
        traces = (collector.outdir / "traces.jsonl").read_text()
        assert SECRET not in traces and "Bearer" not in traces
    finally:
        nginx.terminate()
        nginx.wait(10)
        for s in servers:
            s.close()
        try:
            assert agent.proc is None or agent.stop() == 0, agent.log()[-3000:]
        finally:
            collector.stop()


def curl(port: int, path: str, *args: str) -> tuple[int, str]:
    p = subprocess.Popen(["curl", "-sS", "-k", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}", *args,
                          f"https://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    return p.pid, out


def check_pair(server: dict[str, Any], client: dict[str, Any], method: str, path: str, status: int,
               port: int, server_pid: int | None = None) -> None:
    for s in (server, client):
        a = s["attrs"]
        assert s["name"] == method
        assert a["http.request.method"] == method and a["url.path"] == path, a
        assert a["http.response.status_code"] == status and a["url.scheme"] == "https", a
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == port
        assert a["client.address"] == "127.0.0.1" and a["network.protocol.version"] == "1.1"
        assert int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]) > 0
    assert server["kind"] in SERVER_KIND and client["kind"] in CLIENT_KIND
    assert server["attrs"]["client.port"] == client["attrs"]["client.port"] > 0
    assert server["resource"]["process.pid"] == (server_pid or os.getpid())


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_curl_over_tls_one_server_and_one_client_span_each(env: Env) -> None:
    port = env.ports["curl"]
    calls = [("GET", "/ok", 200, ()), ("GET", "/missing/x", 404, ()), ("POST", "/items", 201, ("-d", "a=1")),
             ("GET", "/boom", 500, ()), ("GET", "/chunked", 200, ()),
             ("GET", "/search", 200, ("-H", f"Authorization: Bearer {SECRET}"))]
    pids = []
    for _method, path, status, args in calls:
        pid, code = curl(port, path, *args)
        assert int(code) == status
        pids.append(pid)
    spans = env.wait_spans(port, len(calls))
    for (method, path, status, _), pid, server, client in zip(calls, pids, spans["server"], spans["client"]):
        check_pair(server, client, method, path, status, port)
        assert client["resource"]["process.pid"] == pid
        assert (server.get("status", {}).get("code") in ERROR) == (status >= 500)
        assert (client.get("status", {}).get("code") in ERROR) == (status >= 400)


def test_twenty_requests_on_one_keep_alive_tls_connection_are_twenty_spans(env: Env) -> None:
    port = env.ports["keepalive"]
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_insecure())
    for i in range(20):
        if i % 2:
            conn.request("POST", f"/post/{i}", body=b"x" * (i * 100))
        else:
            conn.request("GET", f"/ok/{i}?q={i}")
        r = conn.getresponse()
        assert r.status == (201 if i % 2 else 200) and r.read()
    local_port = conn.sock.getsockname()[1]
    conn.close()
    spans = env.wait_spans(port, 20)
    for i, (server, client) in enumerate(zip(spans["server"], spans["client"])):
        if i % 2:
            check_pair(server, client, "POST", f"/post/{i}", 201, port)
        else:
            check_pair(server, client, "GET", f"/ok/{i}", 200, port)
        assert client["attrs"]["client.port"] == local_port


def test_incoming_traceparent_over_tls_is_joined(env: Env) -> None:
    port = env.ports["traceparent"]
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    curl(port, "/traced", "-H", f"traceparent: 00-{trace_id}-{parent}-01")
    spans = env.wait_spans(port, 1)
    server = spans["server"][0]
    assert server["traceId"].lower() == trace_id and server["parentSpanId"].lower() == parent


def test_nginx_with_openssl_curl_and_python_clients(env: Env) -> None:
    port = env.ports["nginx"]
    curl(port, "/a")
    curl(port, "/missing/b")
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_insecure())
    for i in range(5):
        conn.request("GET", f"/k/{i}")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"ok\n"
    conn.request("GET", "/boom")
    assert conn.getresponse().status == 500
    conn.close()
    expected = [("/a", 200), ("/missing/b", 404), *((f"/k/{i}", 200) for i in range(5)), ("/boom", 500)]
    spans = env.wait_spans(port, len(expected))
    for (path, status), server, client in zip(expected, spans["server"], spans["client"]):
        check_pair(server, client, "GET", path, status, port, server_pid=env.nginx.pid)
        assert server["resource"]["process.executable.name"] == "nginx"


GO_CLIENT = """package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: false, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}}
	for i := 0; i < 3; i++ {
		r, err := c.Get(os.Args[1])
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	c.CloseIdleConnections()
}
"""


def test_go_crypto_tls_client_is_counted_unparsed(env: Env, tmp_path: Path) -> None:
    """Go's crypto/tls is not OpenSSL: the client side of its connection is no span, and the
    connection is counted once as tls_unparsed when it closes. The Python server's side, on
    OpenSSL, is still three SERVER spans."""
    if shutil.which("go") is None:
        fail_or_skip("no Go toolchain (deploy/scripts/go-toolchain.sh)")
    port = env.ports["go"]
    (tmp_path / "main.go").write_text(GO_CLIENT)
    (tmp_path / "go.mod").write_text("module tlsclient\n\ngo 1.21\n")
    goenv = go_env(tmp_path)
    subprocess.run(["go", "build", "-o", "client", "."], cwd=tmp_path, env=goenv, check=True, timeout=600,
                   capture_output=True)
    before = env.unparsed("tls_unparsed")
    subprocess.run([str(tmp_path / "client"), f"https://127.0.0.1:{port}/go"], check=True, timeout=60)
    wait_until(lambda: len(env.spans(port)["server"]) >= 3, 30, 0.2, "3 server spans")
    wait_until(lambda: env.unparsed("tls_unparsed") >= before + 1, 30, 0.2, "tls_unparsed counted")
    time.sleep(1.0)
    spans = env.spans(port)
    assert len(spans["server"]) == 3 and not spans["client"]
    assert [s["attrs"]["url.path"] for s in spans["server"]] == ["/go"] * 3
    assert env.unparsed("tls_unparsed") == before + 1


LATE_SERVER = """
import ssl, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s = HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"""


def _libssl_copy(tmp_path: Path) -> Path:
    """A directory with a copy of the system's libssl.so.3 (another file, as in a container image)."""
    import ctypes.util

    system = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
    if not system.exists():
        found = ctypes.util.find_library("ssl")
        if found is None:
            fail_or_skip("no libssl.so.3 on this host")
        system = Path(f"/usr/lib/{found}")
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(system, lib / "libssl.so.3")
    return lib


def _effective_caps(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


CAP_SYS_ADMIN = 21


def test_a_libssl_first_mapped_after_start_is_probed(env: Env, tmp_path: Path) -> None:
    """With ``keep_sys_admin_for_tls``: a server started after the agent, on its own copy of
    libssl (another file, as in a container image): the agent, which kept CAP_SYS_ADMIN alone
    among its start-up capabilities, finds it in the new process's maps and attaches to it. Its
    requests are SERVER spans over https."""
    assert env.agent.proc is not None and _effective_caps(env.agent.proc.pid) >> CAP_SYS_ADMIN & 1
    lib = _libssl_copy(tmp_path)
    port = env.ports["late"]
    server = subprocess.Popen([sys.executable, "-c", LATE_SERVER, str(port), str(env.crt), str(env.key)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(lib)})
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert str(lib / "libssl.so.3") in maps   # the copy, not the system's
        wait_until(lambda: f"TLS uprobes on /proc/{server.pid}/root{lib}/libssl.so.3" in env.agent.log(), 30, 0.2,
                   "the copy probed")
        for i in range(3):
            curl(port, f"/late/{i}")
        spans = env.wait_spans(port, 3)
        for i, (srv, cli) in enumerate(zip(spans["server"], spans["client"])):
            check_pair(srv, cli, "GET", f"/late/{i}", 200, port, server_pid=server.pid)
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def test_without_keep_sys_admin_a_late_libssl_is_not_probed(bpf_ok: None, otelcol_bin: str, tmp_path: Path) -> None:
    """The default: CAP_SYS_ADMIN is dropped after start, the agent says what TLS capture lacks
    without it (its log and ``check``), and a server started later on its own libssl copy is not
    probed: curl's CLIENT span (the system's libssl, probed at start) arrives, the server's side
    is counted as tls_unparsed when the connection closes, and there is no SERVER span."""
    from receiver.config import EbpfConfig
    from receiver.preflight import run_checks

    cfg = EbpfConfig.from_dict({"sources": {"http": {"enabled": True}}}, {})
    rows = {r.requirement: r for r in run_checks(cfg)}
    row = rows["uprobes on a libssl first mapped after start (TLS for http)"]
    assert not row.ok and "not" in row.detail and "keep_sys_admin_for_tls" in row.fix and not row.needed_by

    key, crt = _cert(tmp_path)
    lib = _libssl_copy(tmp_path)
    port = free_port()
    collector = Collector(otelcol_bin, tmp_path).start()
    cfg = {"report_interval": "1s", "ports": [port]}
    agent = Agent(tmp_path, agent_config(collector, {"http": cfg}))
    server = None
    try:
        agent.start()
        assert agent.proc is not None
        wait_until(lambda: "keep_sys_admin_for_tls: true keeps it" in agent.log(), 30, 0.2, "the warning")
        wait_until(lambda: "capabilities after start" in agent.log(), 30, 0.2, "the drop")
        assert not _effective_caps(agent.proc.pid) >> CAP_SYS_ADMIN & 1
        server = subprocess.Popen([sys.executable, "-c", LATE_SERVER, str(port), str(crt), str(key)],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(lib)})
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert str(lib / "libssl.so.3") in Path(f"/proc/{server.pid}/maps").read_text()
        curl(port, "/late/0")
        try:
            wait_until(lambda: spans_by_side(collector, port)["client"], 30, 0.2, "curl's CLIENT span")
        except AssertionError as e:
            raise AssertionError(f"{e}: {agent.log()[-3000:]} " + "\n".join(
                line for line in agent.scrape().splitlines() if "http" in line and not line.startswith("#"))) from None
        clients = spans_by_side(collector, port)["client"]
        assert len(clients) == 1 and clients[0]["attrs"]["url.path"] == "/late/0"
        wait_until(lambda: agent.metric_value("ebpf_receiver_http_unparsed_total", reason="tls_unparsed") >= 1,
                   30, 0.3, "the server side counted tls_unparsed")
        time.sleep(2)   # two more report intervals: a SERVER span would be in by now
        assert not spans_by_side(collector, port)["server"]
        assert f"{lib}/libssl.so.3" not in agent.log()
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
            if server.stdout is not None:
                server.stdout.close()
        try:
            assert agent.proc is None or agent.stop() == 0, agent.log()[-3000:]
        finally:
            collector.stop()
