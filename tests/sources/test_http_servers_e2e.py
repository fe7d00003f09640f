"""HTTP/1.1 servers of other runtimes, end to end: nginx, a Go ``net/http`` server and a Node
``http`` server, each called by curl, Python's ``http.client`` (keep-alive) and a Go client
(keep-alive). Every request must be exactly one SERVER span (the server's process) and one
CLIENT span (the caller's), with the right method, path, status and ports."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, fail_or_skip, free_port, go_env, wait_until
from .http_support import CLIENT_KIND, ERROR, listening, spans_by_side
from .test_https_e2e import start_nginx

pytestmark = [pytest.mark.bpf, pytest.mark.collector, pytest.mark.host]

GO_SERVER = """package main

import (
	"fmt"
	"net/http"
	"os"
	"strings"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/missing"):
			http.Error(w, "no", 404)
		case r.URL.Path == "/boom":
			http.Error(w, "boom", 500)
		default:
			fmt.Fprint(w, "ok\\n")
		}
	})
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		panic(err)
	}
}
"""

GO_CLIENT = """package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	for _, url := range os.Args[1:] {
		r, err := http.Get(url)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
		fmt.Println(r.StatusCode)
	}
}
"""

NODE_SERVER = """
const http = require('http');
http.createServer((req, res) => {
  const body = req.url.startsWith('/missing') ? [404, 'no\\n']
    : req.url === '/boom' ? [500, 'boom\\n'] : [200, 'ok\\n'];
  req.resume();
  req.on('end', () => { res.writeHead(body[0], {'Content-Type': 'text/plain'}); res.end(body[1]); });
}).listen(Number(process.argv[1]), '127.0.0.1', () => console.log('listening'));
"""

SERVERS = ("nginx", "go", "node")


def _build_go(tmp: Path) -> tuple[Path, Path]:
    if shutil.which("go") is None:
        fail_or_skip("no Go toolchain (deploy/scripts/go-toolchain.sh)")
    env = go_env(tmp)
    out = []
    for name, src in (("server", GO_SERVER), ("client", GO_CLIENT)):
        d = tmp / f"go-{name}"
        d.mkdir()
        (d / "main.go").write_text(src)
        (d / "go.mod").write_text(f"module {name}\n\ngo 1.21\n")
        subprocess.run(["go", "build", "-o", name, "."], cwd=d, env=env, check=True, timeout=600, capture_output=True)
        out.append(d / name)
    return out[0], out[1]


class Env:
    def __init__(self, collector: Collector, agent: Agent, ports: dict[str, int],
                 procs: dict[str, subprocess.Popen[Any]], go_client: Path):
        self.collector, self.agent, self.ports, self.procs, self.go_client = collector, agent, ports, procs, go_client

    def spans(self, port: int) -> dict[str, list[dict[str, Any]]]:
        return spans_by_side(self.collector, port)


@pytest.fixture(scope="module")
def env(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("http-servers")
    go_server, go_client = _build_go(tmp)
    if shutil.which("node") is None:
        fail_or_skip("node is not installed")
    collector = Collector(otelcol_bin, tmp).start()
    ports = {name: free_port() for name in SERVERS}
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        procs["nginx"] = start_nginx(tmp, ports["nginx"], tmp / "none", tmp / "none", tls=False)
        procs["go"] = subprocess.Popen([str(go_server), str(ports["go"])], stdin=subprocess.DEVNULL)
        procs["node"] = subprocess.Popen(["node", "-e", NODE_SERVER, str(ports["node"])], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL)
        for name in ("go", "node"):
            wait_until(lambda name=name: listening(ports[name]), 30, 0.1, f"{name} server listening")
        cfg = {"report_interval": "1s", "ports": sorted(ports.values())}
        agent = Agent(tmp, agent_config(collector, {"http": cfg}))
        try:
            agent.start()
            yield Env(collector, agent, ports, procs, go_client)
            assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
            assert agent.metric_value("ebpf_receiver_source_events_lost_total", source="http") == 0
        finally:
            try:
                assert agent.proc is None or agent.stop() == 0, agent.log()[-3000:]
            finally:
                collector.stop()
    finally:
        collector.stop()   # (again: idempotent) also when a server or the agent did not start
        for p in procs.values():
            p.terminate()
            p.wait(10)


def _curl(port: int, path: str) -> tuple[int, int]:
    p = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}{path}"],
                         stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    return p.pid, int(out)


@pytest.mark.parametrize("server", SERVERS)
def test_every_request_of_every_client_is_one_server_and_one_client_span(env: Env, server: str) -> None:
    port = env.ports[server]
    expected: list[tuple[str, str, int, int | None]] = []   # (method, path, status, client pid or None)
    for path, status in (("/c/a", 200), ("/missing/c", 404)):
        pid, code = _curl(port, path)
        assert code == status
        expected.append(("GET", path, status, pid))
    conn = http.client.HTTPConnection("127.0.0.1", port)   # keep-alive
    for path, status in (("/p/0", 200), ("/p/1", 200), ("/boom", 500), ("/p/3", 200)):
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        assert r.status == status
        expected.append(("GET", path, status, None))
    conn.close()
    go_paths = [("/g/0", 200), ("/missing/g", 404), ("/g/2", 200)]
    go = subprocess.Popen([str(env.go_client), *(f"http://127.0.0.1:{port}{p}" for p, _ in go_paths)],
                          stdout=subprocess.PIPE, text=True)
    out, _ = go.communicate(timeout=60)
    assert go.returncode == 0 and out.split() == [str(s) for _, s in go_paths], out
    expected += [("GET", p, s, go.pid) for p, s in go_paths]

    n = len(expected)
    wait_until(lambda: all(len(v) >= n for v in env.spans(port).values()), 30, 0.2,
               f"{n} server and {n} client spans from {server}")
    time.sleep(1.0)
    spans = env.spans(port)
    assert {k: len(v) for k, v in spans.items()} == {"server": n, "client": n}, \
        [(k, s["attrs"].get("url.path")) for k, v in spans.items() for s in v]
    server_pid = env.procs[server].pid
    for (method, path, status, pid), srv, cli in zip(expected, spans["server"], spans["client"]):
        for s in (srv, cli):
            a = s["attrs"]
            assert s["name"] == method and a["http.request.method"] == method and a["url.path"] == path, a
            assert a["http.response.status_code"] == status and a["url.scheme"] == "http"
            assert a["server.address"] == "127.0.0.1" and a["server.port"] == port
            assert a["network.protocol.version"] == "1.1"
        assert srv["attrs"]["client.port"] == cli["attrs"]["client.port"] > 0
        assert srv["resource"]["process.pid"] == server_pid and cli["kind"] in CLIENT_KIND
        if pid is not None:
            assert cli["resource"]["process.pid"] == pid
        assert (srv.get("status", {}).get("code") in ERROR) == (status >= 500)
        assert (cli.get("status", {}).get("code") in ERROR) == (status >= 400)
