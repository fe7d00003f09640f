"""Request links (``sources.profiler.request_links``): real BPF (the http program and the
profiler sharing the pinned thread -> span map), a real threaded Python HTTP server, a real
Collector.

The server (its own process) has three kinds of work: ``/burn`` spends CPU in ``burn_request``
for a known time per request, ``/block`` waits in ``block_request`` (off the CPU), and a
background thread burns CPU in ``outside_requests`` all the time, never inside a request. Each
request carries its own traceparent. Every CPU sample under ``burn_request`` and off-CPU sample
under ``block_request`` must link (OTLP ``link_table``) to the exported SERVER span of a request
of its kind — same trace id as that request's traceparent, the span id the span was exported
with — for at least 90 % of them; no sample under ``outside_requests`` links; every burn
request is linked by some samples; and in the pprof files, ``go tool pprof
-tagfocus=trace_id=...`` keeps that one request's samples."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, free_port, go_env, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

BURN_S = 0.4
BLOCK_S = 0.4
N_BURN = 6
N_BLOCK = 3

SERVER = """\
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BURN_S, BLOCK_S = float(sys.argv[2]), float(sys.argv[3])


def burn_request():
    t = time.thread_time()
    x = 0
    while time.thread_time() - t < BURN_S:
        x += 1
    return x


def block_request():
    time.sleep(BLOCK_S)


def outside_requests():
    while True:
        t = time.thread_time()
        while time.thread_time() - t < 0.05:
            pass
        time.sleep(0.05)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/burn":
            burn_request()
        elif self.path == "/block":
            block_request()
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


threading.Thread(target=outside_requests, daemon=True).start()
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
if len(sys.argv) > 5:   # HTTPS: OpenSSL's libssl, read by the http source's TLS uprobes
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def _trace_id(i: int) -> str:
    return f"{0x4bf92f3577b34da6a3ce929d0e0e4700 + i:032x}"


def _get(port: int, path: str, trace_id: str, tls: bool = False) -> None:
    req = urllib.request.Request(f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}",
                                 headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    context = ssl._create_unverified_context() if tls else None   # the server's self-signed certificate
    with urllib.request.urlopen(req, timeout=30, context=context) as r:
        assert r.read() == b"ok"


def _hex(v: str) -> str:
    """An OTLP/JSON id: hex (the Collector's encoding), or base64 from a plain protobuf JSON."""
    if len(v) in (16, 32) and all(c in "0123456789abcdefABCDEF" for c in v):
        return v.lower()
    import base64
    return base64.b64decode(v).hex()


def _linked_samples(collector: Collector) -> list[tuple[str, set[str], int, tuple[str, str] | None]]:
    """(sample type, function names of its stack, value, (trace id, span id) of its link or
    None) for every sample the Collector wrote."""
    out = []
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings = d.get("stringTable", [])
        funcs, locs, stacks = d.get("functionTable", []), d.get("locationTable", []), d.get("stackTable", [])
        link_table = d.get("linkTable", [])
        for rp in req.get("resourceProfiles", []):
            for sp in rp.get("scopeProfiles", []):
                for p in sp.get("profiles", []):
                    st = p.get("sampleType", {})
                    kind = strings[st.get("typeStrindex", 0)]
                    for sample in p.get("samples", []):
                        names = set()
                        for li in stacks[sample.get("stackIndex", 0)].get("locationIndices", []):
                            for line in locs[li].get("lines", []):
                                names.add(strings[funcs[line.get("functionIndex", 0)].get("nameStrindex", 0)])
                        li = int(sample.get("linkIndex", 0))
                        link = None
                        if li:
                            entry = link_table[li]
                            link = (_hex(entry.get("traceId", "")), _hex(entry.get("spanId", "")))
                        out.append((kind, names, int(sample.get("values", [0])[0]), link))
    return out


def test_samples_link_to_the_server_span_of_their_request(bpf_ok: None, collector: Collector,
                                                          tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(BURN_S), str(BLOCK_S)])
    pprof_dir = tmp_path / "pprof"
    try:
        cfg = {"profiler": {"preset": "debug", "report_interval": "2s", "filter": {"pids": [proc.pid]},
                            "request_links": True, "pprof_dir": str(pprof_dir), "java_frames": False,
                            "off_cpu": {"enabled": True, "sample_probability": 1.0}},
               "http": {"ports": [port], "report_interval": "1s"}}
        agent = Agent(tmp_path, agent_config(collector, cfg)).start(timeout=300)
        try:
            wait_until(lambda: any("outside_requests" in names for _, names, _, _ in _linked_samples(collector)),
                       120, 0.5, "Python frames of the server in profiles.jsonl")
            burn = [_trace_id(i) for i in range(N_BURN)]
            block = [_trace_id(100 + i) for i in range(N_BLOCK)]
            for t in burn:
                _get(port, "/burn", t)
            for t in block:
                _get(port, "/block", t)

            def server_spans() -> dict[str, dict[str, Any]]:
                return {s["traceId"].lower(): s for s in collector.spans()
                        if s.get("kind") in (2, "SPAN_KIND_SERVER") and s["traceId"].lower() in burn + block}

            wait_until(lambda: len(server_spans()) == N_BURN + N_BLOCK, 60, 0.5, "the SERVER spans")
            spans = server_spans()
            want = {(t, _hex(spans[t]["spanId"])) for t in burn}
            want_block = {(t, _hex(spans[t]["spanId"])) for t in block}
            wait_until(lambda: {lk for _, _, _, lk in _linked_samples(collector)} >= want | want_block,
                       60, 0.5, "samples linked to every request")
            # every request of this test was linked (probability 1): none counted otherwise
            assert agent.metric_value("ebpf_receiver_profiler_request_links_total", reason="linked") >= N_BURN + N_BLOCK
            assert agent.metric_value("ebpf_receiver_profiler_request_links_total", reason="not_linked") == 0
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()

    samples = _linked_samples(collector)
    in_burn = [(n, lk) for kind, names, n, lk in samples if kind == "samples" and "burn_request" in names]
    linked = sum(n for n, lk in in_burn if lk in want)
    total = sum(n for n, _ in in_burn)
    assert total > 0 and linked >= 0.9 * total, (linked, total, {lk for _, lk in in_burn})
    in_block = [(n, lk) for kind, names, n, lk in samples if kind == "off_cpu" and "block_request" in names]
    linked_ns = sum(n for n, lk in in_block if lk in want_block)
    total_ns = sum(n for n, _ in in_block)
    assert total_ns > 0 and linked_ns >= 0.9 * total_ns, (linked_ns, total_ns)
    outside = [lk for _, names, _, lk in samples if "outside_requests" in names]
    assert outside and all(lk is None for lk in outside), {lk for lk in outside if lk}

    # pprof: trace_id/span_id labels; -tagfocus on one request's trace keeps only its samples
    if not shutil.which("go"):
        pytest.fail("go is not installed (go tool pprof reads our pprof)")
    from receiver.profiling.output.pprof import read_pprof

    files = sorted(pprof_dir.glob("cpu-*.pb.gz"))
    target, target_span = next(iter(sorted(want)))
    chosen = None
    for path in files:   # a file with this request's samples and another's: the filter must choose
        p = read_pprof(path)
        strings = list(p.string_table)
        traces = {strings[lb.str] for s in p.sample for lb in s.label if strings[lb.key] == "trace_id"}
        if target in traces and len(traces) > 1:
            chosen = path
            break
    assert chosen is not None, f"no pprof file has trace {target} and another"
    out = subprocess.run(["go", "tool", "pprof", "-traces", "-symbolize=none", f"-tagfocus=trace_id={target}",
                          str(chosen)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=go_env(tmp_path), check=False)
    assert out.returncode == 0, out.stderr

    def shown(label: str) -> set[str]:
        return {line.split(":", 1)[1].strip().strip("[]") for line in out.stdout.splitlines()
                if line.strip().startswith(f"{label}:")}

    assert shown("trace_id") == {target}, out.stdout[-3000:]
    assert shown("span_id") == {target_span}, out.stdout[-3000:]


def test_tls_requests_link_like_plaintext_ones(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """HTTPS (Python's ssl, OpenSSL's libssl): the http source sees the request's plaintext in
    SSL_read (TLS uprobes), and the kernel sets the thread's link there as on a plaintext socket;
    at least 90 % of the CPU samples in ``burn_request`` link to the SERVER span of their request."""
    from ..sources.http_support import self_signed_cert

    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    self_signed_cert(key, crt)
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(BURN_S), str(BLOCK_S), str(crt), str(key)])
    try:
        cfg = {"profiler": {"preset": "debug", "report_interval": "2s", "filter": {"pids": [proc.pid]},
                            "request_links": True, "java_frames": False},
               "http": {"ports": [port], "report_interval": "1s"}}
        agent = Agent(tmp_path, agent_config(collector, cfg)).start(timeout=300)
        try:
            def server_spans(traces: list[str]) -> dict[str, dict[str, Any]]:
                return {s["traceId"].lower(): s for s in collector.spans()
                        if s.get("kind") in (2, "SPAN_KIND_SERVER") and s["traceId"].lower() in traces}

            warm = _trace_id(300)

            def warmed() -> bool:
                _get(port, "/", warm, tls=True)
                return bool(server_spans([warm]))

            wait_until(warmed, 120, 1.0, "a SERVER span of an HTTPS request (the TLS uprobes attached)")
            burn = [_trace_id(200 + i) for i in range(N_BURN)]
            for t in burn:
                _get(port, "/burn", t, tls=True)
            wait_until(lambda: len(server_spans(burn)) == N_BURN, 60, 0.5, "the SERVER spans")
            spans = server_spans(burn)
            want = {(t, _hex(spans[t]["spanId"])) for t in burn}
            wait_until(lambda: {lk for _, _, _, lk in _linked_samples(collector)} >= want,
                       60, 0.5, "samples linked to every HTTPS request")
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()
    in_burn = [(n, lk) for kind, names, n, lk in _linked_samples(collector)
               if kind == "samples" and "burn_request" in names]
    linked = sum(n for n, lk in in_burn if lk in want)
    total = sum(n for n, _ in in_burn)
    assert total > 0 and linked >= 0.9 * total, (linked, total, {lk for _, lk in in_burn})
