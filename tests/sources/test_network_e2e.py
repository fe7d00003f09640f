"""TCP network source, end to end: real BPF program → agent → real Collector → its file output.

Connections with known byte counts over IPv4 and IPv6 must give exactly one client and one server
span each with those counts; a connect to a closed port an error span; an abort (SO_LINGER 0)
reset counts; loss on a veth path into a network namespace retransmits, and a clean path none.
A server-port filter keeps other traffic (the agent's own export included) out."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, attributes, free_port, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

N = 20
REQUEST = 3000
RESPONSE = 70_000


def _recv_exactly(s: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = s.recv(min(65536, n - got))
        if not chunk:
            raise AssertionError(f"peer closed after {got} of {n} bytes")
        got += len(chunk)


def _recv_to_eof(s: socket.socket) -> int:
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    return got


class Server:
    """Accepts connections; from each reads ``request`` bytes, writes ``response`` bytes, closes."""

    def __init__(self, family: int, host: str, port: int, request: int, response: int):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.request, self.response = request, response
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    _recv_exactly(conn, self.request)
                    conn.sendall(b"r" * self.response)
                except OSError as e:
                    self.errors.append(e)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def client_exchange(family: int, host: str, port: int, request: int, response: int) -> tuple[str, int]:
    """One connection: send ``request`` bytes, read the ``response`` to EOF; returns the local
    (address, port)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect((host, port))
        local = s.getsockname()[:2]
        s.sendall(b"q" * request)
        got = _recv_to_eof(s)
        assert got == response, (got, response)
    return local[0], local[1]


def abort_connection(family: int, host: str, port: int) -> tuple[str, int]:
    """Connects and closes with SO_LINGER 0: the kernel sends a reset instead of a FIN."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect((host, port))
    local = s.getsockname()[:2]
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    return local[0], local[1]


def tcp_spans(collector: Collector, port: int) -> dict[str, list[dict[str, Any]]]:
    """Connection spans whose server port is ``port``, by direction."""
    out: dict[str, list[dict[str, Any]]] = {"client": [], "server": []}
    for s in collector.spans():
        a = s["attrs"]
        if a.get("network.transport") == "tcp" and a.get("server.port") == port:
            out[a["tcp.connection.direction"]].append(s)
    return out


def latest_value(points: list[dict[str, Any]], **attrs: Any) -> int | None:
    """The newest point's value among those with ``attrs``, summed over any other attributes."""
    sel = [p for p in points if all(p["attrs"].get(k) == v for k, v in attrs.items())]
    if not sel:
        return None
    newest = max(int(p["timeUnixNano"]) for p in sel)
    return sum(int(p.get("asInt", p.get("count", 0))) for p in sel if int(p["timeUnixNano"]) == newest)


def _agent(collector: Collector, tmp_path: Path, ports: list[int], **extra: Any) -> Agent:
    cfg = {"report_interval": "1s", "ports": ports, **extra}
    return Agent(tmp_path, agent_config(collector, {"network": cfg})).start()


def _check_exchange_spans(spans: dict[str, list[dict[str, Any]]], locals_: list[tuple[str, int]],
                          server_host: str, port: int, net_type: str) -> None:
    assert len(spans["client"]) == N and len(spans["server"]) == N, {k: len(v) for k, v in spans.items()}
    me = os.getpid()
    client_ports = sorted(p for _a, p in locals_)
    assert sorted(s["attrs"]["network.local.port"] for s in spans["client"]) == client_ports
    assert sorted(s["attrs"]["network.peer.port"] for s in spans["server"]) == client_ports
    for s in spans["client"]:
        a = s["attrs"]
        assert s["kind"] in (3, "SPAN_KIND_CLIENT"), s["kind"]
        assert a["tcp.connection.sent_bytes"] == REQUEST and a["tcp.connection.received_bytes"] == RESPONSE, a
        assert a["network.peer.address"] == server_host and a["network.peer.port"] == port
        assert a["server.address"] == server_host and a["server.port"] == port
        assert a["network.type"] == net_type and a["tcp.connection.outcome"] == "ok"
        assert a["tcp.connection.resets_sent"] == 0 and a["tcp.connection.resets_received"] == 0
        assert s["resource"]["process.pid"] == me
        assert int(s["endTimeUnixNano"]) > int(s["startTimeUnixNano"])
        assert s.get("status", {}).get("code") in (None, 0, "STATUS_CODE_UNSET")
    for s in spans["server"]:
        a = s["attrs"]
        assert s["kind"] in (2, "SPAN_KIND_SERVER"), s["kind"]
        assert a["tcp.connection.sent_bytes"] == RESPONSE and a["tcp.connection.received_bytes"] == REQUEST, a
        assert a["network.local.address"] == server_host and a["network.local.port"] == port
        assert a["network.type"] == net_type
        assert s["resource"]["process.pid"] == me   # owner from accept's first receive, not softirq


def _exchanges(family: int, host: str, port: int) -> list[tuple[str, int]]:
    server = Server(family, host, port, REQUEST, RESPONSE)
    try:
        locals_ = [client_exchange(family, host, port, REQUEST, RESPONSE) for _ in range(N)]
    finally:
        server.close()
    assert not server.errors, server.errors
    return locals_


def test_connections_exact_ipv4_and_ipv6(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    p4, p6, other = free_port(), free_port(), free_port()
    agent = _agent(collector, tmp_path, [p4, p6])
    try:
        l4 = _exchanges(socket.AF_INET, "127.0.0.1", p4)
        l6 = _exchanges(socket.AF_INET6, "::1", p6)
        _exchanges(socket.AF_INET, "127.0.0.1", other)   # not in the port filter: not reported

        def complete() -> bool:
            return all(len(v) == N for p in (p4, p6) for v in tcp_spans(collector, p).values())

        wait_until(complete, 20, 0.2, "client and server spans for every connection")
        # Metrics of the finished connections: opened/closed/bytes per direction, exact.
        me = os.getpid()

        def metrics_done() -> bool:
            pts = collector.metric_points("tcp.connection.closed", me)
            return latest_value(pts, **{"tcp.connection.direction": "client", "network.type": "ipv6"}) == N

        wait_until(metrics_done, 20, 0.3, "closed-connection metrics")
        lost = agent.metric_value("ebpf_receiver_source_events_lost_total", source="network")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    _check_exchange_spans(tcp_spans(collector, p4), l4, "127.0.0.1", p4, "ipv4")
    _check_exchange_spans(tcp_spans(collector, p6), l6, "::1", p6, "ipv6")
    assert not tcp_spans(collector, other)["client"] and not tcp_spans(collector, other)["server"]
    # The agent's own export connection is never reported, whatever its port.
    assert not [s for s in collector.spans() if s["resource"].get("process.pid") == agent.proc.pid]
    assert lost == 0

    for net_type in ("ipv4", "ipv6"):
        for direction, tx, rx in (("client", REQUEST, RESPONSE), ("server", RESPONSE, REQUEST)):
            sel = {"tcp.connection.direction": direction, "network.type": net_type}
            assert latest_value(collector.metric_points("tcp.connection.opened", me), **sel) == N
            assert latest_value(collector.metric_points("tcp.connection.closed", me),
                                **sel, **{"tcp.connection.outcome": "ok"}) == N
            io = collector.metric_points("tcp.connection.io", me)
            assert latest_value(io, **sel, **{"network.io.direction": "transmit"}) == N * tx
            assert latest_value(io, **sel, **{"network.io.direction": "receive"}) == N * rx
            assert latest_value(collector.metric_points("tcp.connection.duration", me), **sel) == N
            assert latest_value(collector.metric_points("tcp.connection.active", me), **sel) == 0
    hist = next(m for m in collector.metrics() if m["name"] == "tcp.connection.duration")
    assert hist["unit"] == "s"
    assert hist["exponentialHistogram"]["aggregationTemporality"] in (2, "AGGREGATION_TEMPORALITY_CUMULATIVE")


def test_open_connection_is_active_then_counted_once(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    port = free_port()
    me = os.getpid()
    agent = _agent(collector, tmp_path, [port])
    try:
        server = socket.create_server(("127.0.0.1", port))
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        client.sendall(b"x" * 1000)
        _recv_exactly(conn, 1000)

        def active() -> bool:
            pts = collector.metric_points("tcp.connection.active", me)
            return latest_value(pts, **{"tcp.connection.direction": "client"}) == 1

        wait_until(active, 20, 0.3, "the open connection in tcp.connection.active")
        client.sendall(b"x" * 500)
        _recv_exactly(conn, 500)
        for s in (client, conn, server):
            s.close()
        wait_until(lambda: tcp_spans(collector, port)["client"], 20, 0.2, "the client span")

        def closed() -> bool:
            pts = collector.metric_points("tcp.connection.closed", me)
            return latest_value(pts, **{"tcp.connection.direction": "client"}) == 1

        wait_until(closed, 20, 0.3, "the closed count")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    sel = {"tcp.connection.direction": "client"}
    assert latest_value(collector.metric_points("tcp.connection.opened", me), **sel) == 1
    assert latest_value(collector.metric_points("tcp.connection.io", me), **sel,
                        **{"network.io.direction": "transmit"}) == 1500
    assert latest_value(collector.metric_points("tcp.connection.active", me), **sel) == 0
    assert tcp_spans(collector, port)["client"][0]["attrs"]["tcp.connection.sent_bytes"] == 1500


def test_min_span_duration_keeps_short_connections_in_metrics_only(bpf_ok: None, collector: Collector,
                                                                     tmp_path: Path) -> None:
    """Three quick connections and one held for 400 ms, with min_span_duration 200ms: spans only
    for the long one (both sides), while the metrics count all four."""
    port = free_port()
    me = os.getpid()
    agent = _agent(collector, tmp_path, [port], min_span_duration="200ms")
    try:
        server = socket.create_server(("127.0.0.1", port))
        long_local = None
        for hold in (0.0, 0.0, 0.0, 0.4):
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = server.accept()
            if hold:
                long_local = client.getsockname()[1]
                time.sleep(hold)
            client.close()
            conn.close()
        server.close()

        def closed() -> bool:
            pts = collector.metric_points("tcp.connection.closed", me)
            return latest_value(pts, **{"tcp.connection.direction": "client"}) == 4

        wait_until(closed, 20, 0.3, "four closed client connections in the metrics")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    spans = tcp_spans(collector, port)
    assert [sp["attrs"]["network.local.port"] for sp in spans["client"]] == [long_local]
    assert [sp["attrs"]["network.peer.port"] for sp in spans["server"]] == [long_local]
    dur_ms = (int(spans["client"][0]["endTimeUnixNano"]) - int(spans["client"][0]["startTimeUnixNano"])) / 1e6
    assert 380 <= dur_ms <= 600, dur_ms


def test_refused_connect_and_reset(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    closed_port, port = free_port(), free_port()
    agent = _agent(collector, tmp_path, [closed_port, port], addresses=["127.0.0.1/32", "::1"])
    try:
        for host in ("127.0.0.1", "127.0.0.2"):   # the second peer is not in the address filter
            with pytest.raises(ConnectionRefusedError), socket.socket() as s:
                s.connect((host, closed_port))
        server = socket.create_server(("127.0.0.1", port))
        local = abort_connection(socket.AF_INET, "127.0.0.1", port)
        conn, _ = server.accept()
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
        conn.close()
        server.close()
        wait_until(lambda: tcp_spans(collector, closed_port)["client"], 20, 0.2, "the refused connect span")
        wait_until(lambda: all(tcp_spans(collector, port).values()), 20, 0.2, "the reset spans")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    refused = tcp_spans(collector, closed_port)
    assert len(refused["client"]) == 1 and not refused["server"]
    r = refused["client"][0]
    assert r["attrs"]["network.peer.address"] == "127.0.0.1"
    assert r["attrs"]["tcp.connection.outcome"] == "refused" and r["attrs"]["error.type"] == "refused"
    assert r["attrs"]["tcp.connection.resets_received"] == 1
    assert r["status"]["code"] in (2, "STATUS_CODE_ERROR")

    reset = tcp_spans(collector, port)
    assert len(reset["client"]) == 1 and len(reset["server"]) == 1
    c, s = reset["client"][0], reset["server"][0]
    assert c["attrs"]["network.local.port"] == local[1] == s["attrs"]["network.peer.port"]
    assert c["attrs"]["tcp.connection.resets_sent"] == 1 and c["attrs"]["tcp.connection.resets_received"] == 0
    assert s["attrs"]["tcp.connection.resets_received"] == 1 and s["attrs"]["tcp.connection.resets_sent"] == 0
    for span in (c, s):
        assert span["attrs"]["tcp.connection.outcome"] == "reset"
        assert span["status"]["code"] in (2, "STATUS_CODE_ERROR")
    me = os.getpid()

    def reset_counts() -> tuple[int | None, int | None]:
        resets = collector.metric_points("tcp.connection.resets", me)
        return (latest_value(resets, **{"tcp.connection.direction": "client", "network.io.direction": "transmit"}),
                latest_value(resets, **{"tcp.connection.direction": "server", "network.io.direction": "receive"}))

    wait_until(lambda: None not in reset_counts(), 20, 0.2, "the reset metrics")
    assert reset_counts() == (1, 1)



OTHER_CLIENT = r"""
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    s.sendall(b"q" * int(sys.argv[2]))
    while s.recv(65536):
        pass
"""


def test_process_filter_in_kernel_and_agent_never_reports_itself(bpf_ok: None, collector: Collector,
                                                                 tmp_path: Path) -> None:
    """The filter selects processes named like this one's interpreter (the agent's too): this
    process's server side of a connection from a differently named client is reported (owner
    found at its first receive), that client's side is not; and the agent's own connections (here
    the scrape of its /metrics) never are, though the filter would select them."""
    port = free_port()
    me = os.getpid()
    comm = Path(f"/proc/{me}/comm").read_text().strip()
    other = tmp_path / "netotherclient"   # its comm: not selected
    other.symlink_to(sys.executable)
    cfg = {"report_interval": "1s", "filter": {"process_names": [comm]}}
    agent = Agent(tmp_path, agent_config(collector, {"network": cfg})).start()
    assert agent.proc is not None
    assert Path(f"/proc/{agent.proc.pid}/comm").read_text().strip() == comm
    try:
        server = Server(socket.AF_INET, "127.0.0.1", port, REQUEST, RESPONSE)
        try:
            for _ in range(3):
                subprocess.run([str(other), "-c", OTHER_CLIENT, str(port), str(REQUEST)], check=True)
        finally:
            server.close()
        assert agent.scrape()
        wait_until(lambda: len(tcp_spans(collector, port)["server"]) == 3, 20, 0.2, "the server spans")
        wait_until(lambda: tcp_spans(collector, agent.metrics_port)["client"], 20, 0.2,
                   "this process's client span of the scrape")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    spans = tcp_spans(collector, port)
    assert not spans["client"]
    assert all(s["resource"]["process.pid"] == me for s in spans["server"])
    assert all(s["attrs"]["tcp.connection.received_bytes"] == REQUEST for s in spans["server"])
    assert not tcp_spans(collector, agent.metrics_port)["server"]
    assert not [s for s in collector.spans() if s["resource"].get("process.pid") == agent.proc.pid]
    assert not [m for m in collector.metrics() if m["resource"].get("process.pid") == agent.proc.pid]


def test_peer_attributes_bounded_by_overflow_series(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """With peer attributes every server-side connection (ephemeral client port) is its own
    attribute set: beyond max_attribute_sets they all go to the one overflow series."""
    port = free_port()
    agent = _agent(collector, tmp_path, [port], peer_attributes=True, max_attribute_sets=2)
    try:
        server = Server(socket.AF_INET, "127.0.0.1", port, REQUEST, RESPONSE)
        try:
            for _ in range(5):
                client_exchange(socket.AF_INET, "127.0.0.1", port, REQUEST, RESPONSE)
        finally:
            server.close()
        wait_until(lambda: len(tcp_spans(collector, port)["server"]) == 5, 20, 0.2, "the server spans")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]

    def opened() -> list[dict[str, Any]]:
        pts = [dp for m in collector.metrics() if m["name"] == "tcp.connection.opened"
               for dp in m["sum"]["dataPoints"]]
        newest = max((int(p["timeUnixNano"]) for p in pts), default=0)
        return [{**p, "attrs": attributes(p.get("attributes"))} for p in pts if int(p["timeUnixNano"]) == newest]

    wait_until(lambda: sum(int(p["asInt"]) for p in opened()) == 10, 20, 0.3, "the final opened counts")
    latest = opened()
    overflow = [p for p in latest if p["attrs"] == {"otel.metric.overflow": True}]
    regular = [p for p in latest if "otel.metric.overflow" not in p["attrs"]]
    assert len(overflow) == 1 and len(regular) == 2, latest
    assert all("network.peer.port" in p["attrs"] for p in regular)
    assert int(overflow[0]["asInt"]) == 10 - sum(int(p["asInt"]) for p in regular) >= 4


# ---------------------------------------------------------------------------------- retransmits

LOSSY_RESPONSE = 400_000
# Drops about 10% of the data-carrying frames arriving on the veth end in this namespace (the
# kernel here has no netem); handshakes and pure ACKs pass, so connects never stall.
DROP_XDP = r"""
int drop_some(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    if (end - data > 200 && bpf_get_prandom_u32() % 100 < 10)
        return XDP_DROP;
    return XDP_PASS;
}
"""

NS_SERVER = r"""
import socket, sys
port, request, response, n = map(int, sys.argv[1:5])
srv = socket.create_server(("0.0.0.0", port))
print("ready", flush=True)
for _ in range(n):
    conn, _ = srv.accept()
    with conn:
        got = 0
        while got < request:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        conn.sendall(b"r" * response)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def lossy_namespace() -> Iterator[tuple[str, str]]:
    """A network namespace behind a veth pair whose root end drops ~10% of data frames."""
    from bcc import BPF

    tag = uuid.uuid4().hex[:6]
    ns, root_if, ns_if = f"nettest{tag}", f"nt{tag}a", f"nt{tag}b"
    octet = int(tag[:2], 16)
    bpf = None
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", root_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"10.213.{octet}.1/24", "dev", root_if)
        _ip("link", "set", root_if, "up")
        _ip("-n", ns, "addr", "add", f"10.213.{octet}.2/24", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        bpf = BPF(text=DROP_XDP)
        bpf.attach_xdp(root_if, bpf.load_func("drop_some", BPF.XDP), 0)
        yield ns, f"10.213.{octet}.2"
    finally:
        if bpf is not None:
            bpf.remove_xdp(root_if, 0)
            bpf.cleanup()
        subprocess.run(["ip", "link", "del", root_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_retransmits_on_lossy_path_only(bpf_ok: None, collector: Collector, tmp_path: Path,
                                        lossy_namespace: tuple[str, str]) -> None:
    ns, ns_addr = lossy_namespace
    lossy_port, clean_port = free_port(), free_port()
    n = 3
    agent = _agent(collector, tmp_path, [lossy_port, clean_port])
    server = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", NS_SERVER, str(lossy_port),
                               str(REQUEST), str(LOSSY_RESPONSE), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for _ in range(n):
            client_exchange(socket.AF_INET, ns_addr, lossy_port, REQUEST, LOSSY_RESPONSE)
        assert server.wait(20) == 0
        clean = Server(socket.AF_INET, "127.0.0.1", clean_port, REQUEST, LOSSY_RESPONSE)
        try:
            for _ in range(n):
                client_exchange(socket.AF_INET, "127.0.0.1", clean_port, REQUEST, LOSSY_RESPONSE)
        finally:
            clean.close()

        def complete() -> bool:
            return all(len(v) == n for p in (lossy_port, clean_port) for v in tcp_spans(collector, p).values())

        wait_until(complete, 20, 0.2, "spans of the lossy and the clean connections")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
        assert agent.stop() == 0, agent.log()[-3000:]
    lossy = tcp_spans(collector, lossy_port)
    for s in lossy["server"]:   # the namespace's server sends the data that is dropped
        assert s["attrs"]["tcp.connection.retransmits"] > 0, s["attrs"]
        assert s["attrs"]["tcp.connection.sent_bytes"] == LOSSY_RESPONSE
        assert s["resource"]["process.pid"] == server.pid   # `ip netns exec` execs the server
    for s in lossy["client"]:
        assert s["attrs"]["tcp.connection.received_bytes"] == LOSSY_RESPONSE
        assert s["attrs"]["network.peer.address"] == ns_addr
    for s in [*tcp_spans(collector, clean_port)["client"], *tcp_spans(collector, clean_port)["server"]]:
        assert s["attrs"]["tcp.connection.retransmits"] == 0, s["attrs"]
