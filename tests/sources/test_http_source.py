"""The http source without BPF: the conversion rules (receiver/convert/http.py: names, error
status, traceparent) and the source's decoding of kernel records (receiver/sources/http.py:
pairing into requests, histograms bounded by an overflow series, short records)."""

from __future__ import annotations

import ctypes
import random
from typing import Any

from receiver.config import EbpfConfig
from receiver.convert.http import parse_traceparent, request_span
from receiver.kernel.clock import KernelClock
from receiver.records import HttpRequest, HttpSnapshot
from receiver.sources.base import SourceContext
from receiver.telemetry import SelfTelemetry


def _request(**kw: Any) -> HttpRequest:
    base = dict(pid=5, comm="srv", cgroup_id=0, start_unix_nano=10**18, duration_ns=2_000_000, server=True,
                method="GET", path="/a", scheme="http", version="1.1", status=200, server_address="127.0.0.1",
                server_port=8080, client_address="127.0.0.2", client_port=50000)
    return HttpRequest(**{**base, **kw})


def _attrs(span: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return {kv.key: list(MessageToDict(kv.value).values())[0] for kv in span.attributes}


def test_span_attributes_and_error_status() -> None:
    s = request_span(_request())
    a = _attrs(s)
    assert s.name == "GET" and s.kind == 2 and s.end_time_unix_nano - s.start_time_unix_nano == 2_000_000
    assert a["http.request.method"] == "GET" and a["url.path"] == "/a" and a["url.scheme"] == "http"
    assert a["http.response.status_code"] == "200" and a["server.port"] == "8080"
    assert a["client.address"] == "127.0.0.2" and a["network.protocol.version"] == "1.1"
    assert s.status.code == 0 and "error.type" not in a
    for server, status, error in ((True, 404, False), (False, 404, True), (True, 503, True), (False, 500, True)):
        s = request_span(_request(server=server, status=status))
        assert (s.status.code == 2) == error, (server, status)
        assert (_attrs(s).get("error.type") == str(status)) == error
    s = request_span(_request(status=0, error="connection closed"))
    assert s.status.code == 2 and _attrs(s)["error.type"] == "connection_closed"
    s = request_span(_request(method="PURGE"))
    assert s.name == "HTTP" and _attrs(s)["http.request.method"] == "_OTHER"
    assert _attrs(s)["http.request.method_original"] == "PURGE"


def test_traceparent_joins_the_callers_trace() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    s = request_span(_request(traceparent=tp))
    assert s.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and s.parent_span_id.hex() == "00f067aa0ba902b7"
    assert s.span_id.hex() != "00f067aa0ba902b7"
    for bad in ("", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "ff-" + tp[3:],
                "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
                tp.upper(), tp + "-extra"):
        assert parse_traceparent(bad) is None, bad
    assert parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future") is not None
    assert not request_span(_request(traceparent="garbage")).parent_span_id


# ------------------------------------------------------------------------------ the source, no BPF


class _Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.snapshots: list[Any] = []

    def consume_event(self, record: Any) -> None:
        self.events.append(record)

    def consume_metrics(self, snapshot: Any) -> None:
        self.snapshots.append(snapshot)

    def consume_profile(self, profile: Any) -> None:
        pass


def _source(**http: Any) -> Any:
    from receiver.sources.http import HttpSource

    config = EbpfConfig.from_dict({"sources": {"http": {"enabled": True, **http}}}, {})
    return HttpSource(SourceContext(config, _Recorder(), SelfTelemetry(), KernelClock()))


def _record(kind: int, data: bytes = b"", size: int | None = None, sk: int = 0xffff1, local_port: int = 8080,
            peer_port: int = 40000, ts: int = 1) -> bytes:
    from receiver.sources.http import F_ENDPOINTS, HttpEvent

    ev = HttpEvent(ts_ns=ts, sk=sk, conn_id=7, pid=4242, tid=4242, fd=3, size=len(data) if size is None else size,
                   len=len(data), local_port=local_port, peer_port=peer_port, kind=kind, flags=F_ENDPOINTS)
    for field in (ev.local_addr, ev.peer_addr):
        ctypes.memmove(ctypes.addressof(field), b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1]), 16)
    ev.comm = b"server"
    return bytes(ev) + data


def _deliver(src: Any, rec: bytes) -> None:
    buf = ctypes.create_string_buffer(rec, len(rec))
    src.handle_event(ctypes.addressof(buf), len(rec))


def test_source_pairs_records_into_requests_and_histograms() -> None:
    from receiver.sources.http import EV_CLOSE, EV_RECV, EV_SEND

    src = _source()
    rng = random.Random(1)
    for i in range(20):
        _deliver(src, _record(EV_RECV, b"GET /r/%d?q=1 HTTP/1.1\r\nHost: x\r\n\r\n" % i, ts=10 * i + 1))
        _deliver(src, _record(EV_SEND, b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % rng.choice((200, 404)),
                              ts=10 * i + 5))
    _deliver(src, _record(EV_CLOSE))
    events = src.ctx.consumer.events
    assert [e.path for e in events] == [f"/r/{i}" for i in range(20)]
    e = events[0]
    assert (e.server, e.server_address, e.server_port, e.client_port, e.duration_ns) == (True, "127.0.0.1", 8080,
                                                                                         40000, 4)
    assert not src._conns
    src.collect()
    snap = src.ctx.consumer.snapshots[0]
    assert isinstance(snap, HttpSnapshot)
    points = snap.by_pid[4242].points
    assert sum(count for _k, _c, _s, count in points) == 20
    assert {k[1:3] for k, *_ in points} <= {("GET", 200), ("GET", 404)}


def test_source_counts_short_records_as_decode_errors() -> None:
    from receiver.sources.http import EV_RECV

    src = _source()
    rec = _record(EV_RECV, b"GET / HTTP/1.1\r\n\r\n")
    _deliver(src, rec[:-5])   # says 18 bytes follow, has 13
    total = sum(s.value for f in src.ctx.telemetry.events_lost.collect() for s in f.samples
                if s.name.endswith("_total") and s.labels == {"source": "http", "reason": "decode_error"})
    assert total == 1 and not src._conns


def test_metric_attribute_sets_are_bounded_with_an_overflow_series() -> None:
    from receiver.sources.http import EV_CLOSE, EV_RECV, EV_SEND

    src = _source(max_attribute_sets=3)
    for i in range(10):   # a distinct client port and status each: only status is an attribute
        sk = 0x1000 + i
        _deliver(src, _record(EV_RECV, b"GET /%d HTTP/1.1\r\n\r\n" % i, sk=sk, peer_port=40000 + i))
        _deliver(src, _record(EV_SEND, b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % (200 + i), sk=sk))
        _deliver(src, _record(EV_CLOSE, sk=sk))
    src.collect()
    snap = src.ctx.consumer.snapshots[0]
    regular = snap.by_pid[4242].points
    overflow = snap.by_pid[0].points
    assert len(regular) == 3 and len(overflow) == 1
    assert overflow[0][0][1] == "" and overflow[0][3] == 7
    assert not [k for k, *_ in regular if "/" in str(k)]   # never a path



def test_idle_connections_are_forgotten(monkeypatch: Any) -> None:
    from receiver.sources import http as http_source
    from receiver.sources.http import EV_RECV, EV_SEND, IDLE_NS, STUCK_NS

    src = _source()
    _deliver(src, _record(EV_RECV, b"GET /waits HTTP/1.1\r\n\r\n", sk=1, ts=1_000))   # no answer yet
    _deliver(src, _record(EV_RECV, b"GET /x HTTP/1.1\r\n\r\n", sk=2, ts=2_000))
    _deliver(src, _record(EV_SEND, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", sk=2, ts=3_000))
    now = [3_000 + IDLE_NS - 1]
    monkeypatch.setattr(http_source.time, "monotonic_ns", lambda: now[0])
    src.collect()
    assert len(src._conns) == 2
    now[0] = 3_000 + IDLE_NS
    src.collect()
    assert [k[0] for k in src._conns] == [1]   # idle with nothing in flight: forgotten
    now[0] = 1_000 + STUCK_NS
    src.collect()
    assert not src._conns and src.unparsed.counts["lost_data"] == 1   # its close never came


def test_sys_admin_is_kept_after_start_only_when_asked_for_tls() -> None:
    """sources.http.keep_sys_admin_for_tls (default off): CAP_SYS_ADMIN stays after start only
    with it, only with the http source running, and only when the agent has it."""
    from receiver.kernel import privileges

    assert not EbpfConfig.from_dict({"sources": {"http": {"enabled": True}}}, {}).sources.http.keep_sys_admin_for_tls
    has = privileges._capget()[0] >> privileges.CAP["sys_admin"] & 1
    for sources, asked, kept in ((["http"], False, False), (["http"], True, bool(has)),
                                 (["syscalls"], True, False)):
        keep = privileges.needed_capabilities(sources, bpf_calls_checked=False, tls_late_libraries=asked)
        assert ("sys_admin" in keep) == kept, (sources, asked)


def test_ring_reader_reads_records_in_order_across_the_wrap() -> None:
    """RingReader on memory laid out as the kernel maps a ring buffer (consumer page; producer
    page, then the data twice): records in order, one that wraps read whole from the second
    copy, a discarded one skipped, a BUSY one stops the read (read on the next call), and the
    consumer position stored where the next read starts."""
    import struct

    from receiver.sources.http import RingReader

    page, size = 64, 256
    cons, data = bytearray(8), bytearray(page + 2 * size)
    prod = 0

    def put(payload: bytes, pos: int, flags: int = 0) -> int:
        rec = struct.pack("<II", len(payload) | flags, 0) + payload
        for i, b in enumerate(rec):   # the data is mapped twice: write both copies
            data[page + (pos + i) % size] = b
            data[page + size + (pos + i) % size] = b
        return pos + ((len(payload) + 15) & ~7)

    got: list[bytes] = []
    reader = RingReader(cons, data, size, page)
    start = 200   # positions only grow; the next records cross the end of the data at 256
    struct.pack_into("<Q", cons, 0, start)
    first = put(b"A" * 30, start)                        # 200..240
    second = put(b"C" * 25, first)                       # 240..280: wraps at 256
    assert first % size < size < first % size + (second - first)
    third = put(b"B" * 20, second, RingReader.DISCARD)
    busy = put(b"D" * 10, third, RingReader.BUSY)
    prod = busy
    struct.pack_into("<Q", data, 0, prod)
    assert reader.read(got.append) == 3
    assert got == [b"A" * 30, b"C" * 25]
    assert struct.unpack_from("<Q", cons)[0] == third   # stopped at the BUSY record
    put(b"D" * 10, third)   # committed now
    assert reader.read(got.append) == 1 and got[-1] == b"D" * 10
    assert struct.unpack_from("<Q", cons)[0] == prod
    assert reader.read(got.append) == 0
