"""What the http source's end-to-end tests share (HTTP/1, TLS, gRPC and real servers): span kinds,
spans by side for a server port, the newest duration-histogram points of this process, a
self-signed certificate, and waiting for a port to listen."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..harness import Collector, wait_until

SERVER_KIND = (2, "SPAN_KIND_SERVER")
CLIENT_KIND = (3, "SPAN_KIND_CLIENT")
ERROR = (2, "STATUS_CODE_ERROR")


def is_http(attrs: dict[str, Any]) -> bool:
    return "http.request.method" in attrs


def spans_by_side(collector: Collector, port: int,
                  select: Callable[[dict[str, Any]], bool] = is_http) -> dict[str, list[dict[str, Any]]]:
    """The spans (``select``-ed by their attributes) whose server port is ``port``, by side, in
    start order."""
    out: dict[str, list[dict[str, Any]]] = {"server": [], "client": []}
    for s in collector.spans():
        a = s["attrs"]
        if select(a) and a.get("server.port") == port:
            out["server" if s["kind"] in SERVER_KIND else "client"].append(s)
    for v in out.values():
        v.sort(key=lambda s: int(s["startTimeUnixNano"]))
    return out


def wait_spans_by_side(spans: Callable[[], dict[str, list[dict[str, Any]]]], port: int, n: int,
                       details: Callable[[], str], timeout: float = 30, interval: float = 0.2,
                       settle: float = 1.0) -> dict[str, list[dict[str, Any]]]:
    """``spans()`` once it has ``n`` server and ``n`` client spans, and still exactly that many
    ``settle`` seconds later (a duplicate would have arrived by then); ``details()`` explains a
    timeout."""
    try:
        wait_until(lambda: all(len(v) >= n for v in spans().values()), timeout, interval,
                   f"{n} server and {n} client spans on port {port}")
    except AssertionError as e:
        raise AssertionError(f"{e}: {details()}") from None
    time.sleep(settle)
    out = spans()
    assert {k: len(v) for k, v in out.items()} == {"server": n, "client": n}, \
        [(s["name"], s["attrs"].get("url.path")) for v in out.values() for s in v]
    return out


def newest_histogram_points(collector: Collector, name: str, port: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(attributes, data point) of the newest points of the histogram ``name`` for this process
    and server port; each in seconds, its buckets summing to its count."""
    points = []
    for m in collector.metrics():
        if m["name"] != name or m["resource"].get("process.pid") != os.getpid():
            continue
        assert m["unit"] == "s"
        for dp in m["histogram"]["dataPoints"]:
            attrs = {kv["key"]: kv["value"] for kv in dp.get("attributes", [])}
            if int(attrs.get("server.port", {}).get("intValue", 0)) == port:
                points.append((int(dp["timeUnixNano"]), attrs, dp))
    if not points:
        return []
    newest = max(t for t, _a, _d in points)
    out = [(attrs, dp) for t, attrs, dp in points if t == newest]
    for _attrs, dp in out:
        assert sum(int(c) for c in dp["bucketCounts"]) == int(dp["count"])
    return out


def self_signed_cert(key: Path, crt: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=60)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_listening(port: int, what: str, timeout: float = 20) -> None:
    wait_until(lambda: listening(port), timeout, 0.1, what)
