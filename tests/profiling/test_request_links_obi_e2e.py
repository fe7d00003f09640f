"""OBI interop of request links (docs/profiler.md#request-links): OBI's trace context map
``<bpf.pin_path>/otel/traces_ctx_v1`` (LRU hash, key pid_tgid = tgid << 32 | tid, value
``{u8 trace_id[16]; u8 span_id[8]}``, 1 << 14 entries, pinned by name), with real BPF, real
Python processes and a real Collector.

Read (``sources.profiler.traces_ctx_read``): this test plays OBI: it creates and pins the map,
then writes an entry for one thread of a process that burns CPU in two threads. The samples of
that thread link (OTLP ``link_table``) to the entry's trace and span, the other thread's none.

Write (``sources.http.traces_ctx_write``, the profiler off: the OpenTelemetry eBPF profiler
would read the map): the agent creates and pins the map; while a threaded HTTP server serves a
request that carries a traceparent, the map holds, for the serving thread, that trace id and the
span id of the SERVER span the agent exports; after the response it holds nothing for the server.

Each test pins under its own directory of /sys/fs/bpf (``bpf.pin_path``), never the host's
``/sys/fs/bpf/otel``."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, free_port, wait_until
from .test_request_links_e2e import _hex, _linked_samples

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

LRU_HASH = 9
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


class Value(ctypes.Structure):
    _fields_ = [("trace_id", ctypes.c_uint8 * 16), ("span_id", ctypes.c_uint8 * 8)]


class TracesCtx:
    """traces_ctx_v1 as OBI sees it: opened at its pin, or created and pinned."""

    def __init__(self, path: Path, create: bool):
        from receiver.kernel.libbpf import lib, map_create, map_info

        self.lib = lib()
        fd = self.lib.bpf_obj_get(str(path).encode())
        if fd < 0 and create:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = map_create(LRU_HASH, "traces_ctx_v1", 8, 24, 1 << 14, 0)
            assert self.lib.bpf_obj_pin(fd, str(path).encode()) == 0, os.strerror(ctypes.get_errno())
        assert fd >= 0, f"no map pinned at {path}"
        self.fd = fd
        info = map_info(fd)
        assert (info["type"], info["key_size"], info["value_size"], info["max_entries"]) == (LRU_HASH, 8, 24, 1 << 14)

    def put(self, pid: int, tid: int, trace: str, span: str) -> None:
        v = Value()
        ctypes.memmove(v.trace_id, bytes.fromhex(trace), 16)
        ctypes.memmove(v.span_id, bytes.fromhex(span), 8)
        k = ctypes.c_uint64((pid << 32) | tid)
        assert self.lib.bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), 0) == 0

    def entries(self) -> dict[int, tuple[str, str]]:
        out = {}
        key, nxt, v = ctypes.c_uint64(), ctypes.c_uint64(), Value()
        prev = None
        while self.lib.bpf_map_get_next_key(self.fd, prev, ctypes.byref(nxt)) == 0:
            key.value = nxt.value
            if self.lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(v)) == 0:
                out[key.value] = (bytes(v.trace_id).hex(), bytes(v.span_id).hex())
            prev = ctypes.byref(key)
        return out

    def close(self) -> None:
        os.close(self.fd)


BURNER = """\
import json, threading


def obi_linked_work():
    x = 0
    while True:
        x += 1


def unlinked_work():
    x = 0
    while True:
        x += 1


ids = {}
ready = threading.Barrier(3)


def run(name, fn):
    ids[name] = threading.get_native_id()
    ready.wait()
    fn()


for name, fn in (("linked", obi_linked_work), ("unlinked", unlinked_work)):
    threading.Thread(target=run, args=(name, fn), daemon=True).start()
ready.wait()
print(json.dumps(ids), flush=True)
threading.Event().wait()
"""


def test_samples_link_to_the_trace_context_obi_keeps_for_their_thread(bpf_ok: None, collector: Collector,
                                                                      tmp_path: Path, pin_dir: Path) -> None:
    obi = TracesCtx(pin_dir / "otel" / "traces_ctx_v1", create=True)   # OBI started first
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ids = json.loads(proc.stdout.readline())
        obi.put(proc.pid, ids["linked"], TRACE, SPAN)
        cfg = {"profiler": {"preset": "debug", "report_interval": "2s", "filter": {"pids": [proc.pid]},
                            "traces_ctx_read": True, "java_frames": False}}
        agent = Agent(tmp_path, agent_config(collector, cfg, bpf={"pin_path": str(pin_dir)})).start(timeout=300)
        try:
            def enough() -> bool:
                samples = _linked_samples(collector)
                return (sum(n for k, names, n, _ in samples if "obi_linked_work" in names) >= 100
                        and sum(n for k, names, n, _ in samples if "unlinked_work" in names) >= 100)

            wait_until(enough, 180, 0.5, "100 samples of each thread")
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        obi.close()
    samples = _linked_samples(collector)
    linked = [(n, lk) for kind, names, n, lk in samples if kind == "samples" and "obi_linked_work" in names]
    total = sum(n for n, _ in linked)
    hits = sum(n for n, lk in linked if lk == (TRACE, SPAN))
    assert total and hits >= 0.9 * total, (hits, total, {lk for _, lk in linked})
    other = [lk for kind, names, _, lk in samples if "unlinked_work" in names]
    assert other and all(lk is None for lk in other), {lk for lk in other if lk}
    # the agent opened OBI's pin, it did not replace it, and left it pinned for OBI
    assert (pin_dir / "otel" / "traces_ctx_v1").exists()


SERVER = """\
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/hold":
            time.sleep(float(sys.argv[2]))
        body = str(threading.get_native_id()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
HOLD_S = 3.0


def _get(port: int, path: str, trace: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(r.read())


def test_the_http_source_writes_its_server_span_while_the_request_is_served(
        bpf_ok: None, collector: Collector, tmp_path: Path, pin_dir: Path) -> None:
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(HOLD_S)])
    path = pin_dir / "otel" / "traces_ctx_v1"
    try:
        cfg = {"http": {"ports": [port], "report_interval": "1s", "traces_ctx_write": True}}
        agent = Agent(tmp_path, agent_config(collector, cfg, bpf={"pin_path": str(pin_dir)})).start(timeout=300)
        try:
            assert path.exists(), "the agent did not create and pin traces_ctx_v1"
            obi = TracesCtx(path, create=False)
            warm = f"{0x1111:032x}"

            def warm_span() -> bool:
                _get(port, "/", warm)
                return any(s["traceId"].lower() == warm for s in collector.spans())

            wait_until(warm_span, 60, 1.0, "the http source's first span")
            served: dict[str, Any] = {}
            caller = threading.Thread(target=lambda: served.setdefault("tid", _get(port, "/hold", TRACE)))
            caller.start()
            try:
                def held() -> dict[int, tuple[str, str]]:
                    return {k: v for k, v in obi.entries().items() if k >> 32 == proc.pid}

                wait_until(lambda: bool(held()), HOLD_S, 0.05, "the server thread's entry during the request")
                during = held()
            finally:
                caller.join()
            wait_until(lambda: not held(), 10, 0.1, "no entry after the response")
            wait_until(lambda: any(s["traceId"].lower() == TRACE for s in collector.spans()), 30, 0.5,
                       "the SERVER span")
            span = next(s for s in collector.spans() if s["traceId"].lower() == TRACE
                        and s.get("kind") in (2, "SPAN_KIND_SERVER"))
            assert during == {(proc.pid << 32) | served["tid"]: (TRACE, _hex(span["spanId"]))}
            assert agent.metric_value("ebpf_receiver_profiler_request_links_total", reason="written") >= 1
            obi.close()
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()
    with contextlib.suppress(OSError):
        os.unlink(path)
