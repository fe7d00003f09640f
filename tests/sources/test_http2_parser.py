"""HTTP/2 parser (receiver/protocols/http2.py) with packed bytes: frames and header blocks made
by the python-hyper ``hpack`` encoder (an independent HPACK implementation), fed as the kernel
would hand them over: in any split, interleaved, cut by the capture, or from mid-way."""

from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.protocols import PROTOCOLS, UNPARSED_REASONS, Unparsed, detect, http2
from receiver.protocols.http1 import Http1Connection
from receiver.protocols.http2 import (
    MIDWAY_TRIES,
    PREFACE,
    HpackTable,
    Http2Connection,
    Http2Exchange,
    after_h2c_upgrade,
    decode_block,
    looks_like_http2,
)

from ..harness import examples

DATA, HEADERS, RST, SETTINGS, CONTINUATION = 0, 1, 3, 4, 9
END_STREAM, END_HEADERS, PADDED = 1, 4, 8


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def req_headers(path: str, method: str = "POST", grpc: bool = True, extra: tuple = ()) -> list[tuple[str, str]]:
    h = [(":method", method), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1:50051")]
    if grpc:
        h += [("content-type", "application/grpc"), ("te", "trailers")]
    return h + list(extra)


class Peer:
    """One side's encoder and the bytes it writes."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()

    def headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool = False, split: int = 0,
                pad: int = 0) -> bytes:
        block = self.enc.encode(headers)
        flags = END_STREAM if end_stream else 0
        if split and len(block) > split:
            out = frame(HEADERS, flags, sid, block[:split])
            rest = block[split:]
            while rest:
                part, rest = rest[:split], rest[split:]
                out += frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part)
            return out
        if pad:
            return frame(HEADERS, flags | END_HEADERS | PADDED, sid, bytes([pad]) + block + b"\0" * pad)
        return frame(HEADERS, flags | END_HEADERS, sid, block)


def grpc_call(cli: Peer, srv: Peer, sid: int, method: str, status: int = 0,
              message: bytes = b"\0\0\0\0\x05hello") -> tuple[bytes, bytes]:
    """(request bytes, response bytes) of one unary gRPC call."""
    req = cli.headers(sid, req_headers(method)) + frame(DATA, END_STREAM, sid, message)
    resp = (srv.headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            + frame(DATA, 0, sid, message)
            + srv.headers(sid, [("grpc-status", str(status)), ("grpc-message", "")], end_stream=True))
    return req, resp


def conn(whole: bool | None = True) -> tuple[Http2Connection, Unparsed]:
    u = Unparsed(UNPARSED_REASONS)
    return Http2Connection(u, 16384, whole), u


def names(c: Http2Connection) -> list[tuple[bool, str, str, int, int | None]]:
    out = []
    for ex in c.exchanges:
        assert isinstance(ex, Http2Exchange)
        out.append((ex.server, ex.method, ex.path, ex.status, ex.grpc_status))
    return out


SETTINGS_FRAME = frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535))


def test_detect_the_preface_and_a_first_settings_frame() -> None:
    assert detect(PREFACE + SETTINGS_FRAME) == "http2" and detect(b"PRI * HTTP/2.0") == "http2"
    assert detect(SETTINGS_FRAME) == "http2" and detect(frame(SETTINGS, 0, 0)) == "http2"
    assert detect(b"GET / HTTP/1.1\r\n") == "http1" and detect(b"\x16\x03\x01\x02\x00") is None
    assert not looks_like_http2(frame(SETTINGS, 0, 1, b"x" * 6)) and not looks_like_http2(frame(SETTINGS, 0, 0, b"x"))
    assert PROTOCOLS["http2"] is Http2Connection
    headers = Peer().headers(1, req_headers("/a.B/C"))
    assert detect(headers) == "http2" and not looks_like_http2(headers)   # mid-way
    assert detect(frame(HEADERS, END_HEADERS, 2, b"\x88")) is None   # a server-initiated stream


def test_unary_grpc_calls_server_and_client_side_with_the_dynamic_table_across_requests() -> None:
    cli, srv = Peer(), Peer()
    server, u = conn()
    client, _ = conn()
    client.feed(True, PREFACE + SETTINGS_FRAME, len(PREFACE) + 15, 1)
    server.feed(False, PREFACE + SETTINGS_FRAME, len(PREFACE) + 15, 1)
    server.feed(True, SETTINGS_FRAME, 15, 2)
    client.feed(False, SETTINGS_FRAME, 15, 2)
    for i in range(5):
        status = 5 if i == 3 else 0
        req, resp = grpc_call(cli, srv, 1 + 2 * i, "/helloworld.Greeter/SayHello", status)
        client.feed(True, req, len(req), 10 + i * 10)
        server.feed(False, req, len(req), 11 + i * 10)
        server.feed(True, resp, len(resp), 12 + i * 10)
        client.feed(False, resp, len(resp), 13 + i * 10)
    expect = [(200, 5 if i == 3 else 0) for i in range(5)]
    assert [(n[3], n[4]) for n in names(server)] == expect == [(n[3], n[4]) for n in names(client)]
    assert {n[:3] for n in names(server)} == {(True, "POST", "/helloworld.Greeter/SayHello")}
    assert {n[:3] for n in names(client)} == {(False, "POST", "/helloworld.Greeter/SayHello")}
    assert all(ex.grpc for ex in server.exchanges) and all(ex.version == "2" for ex in client.exchanges)
    assert [(ex.start_ns, ex.end_ns) for ex in server.exchanges] == [(11 + i * 10, 12 + i * 10) for i in range(5)]
    assert [(ex.start_ns, ex.end_ns) for ex in client.exchanges] == [(10 + i * 10, 13 + i * 10) for i in range(5)]
    assert server.server is True and client.server is False
    assert not any(u.counts.values()) and not server.streams


def test_interleaved_streams_continuation_padding_trailers_and_reset() -> None:
    cli, srv = Peer(), Peer()
    c, u = conn()
    b = PREFACE + SETTINGS_FRAME
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    b += cli.headers(1, req_headers("/a.S/One", extra=(("traceparent", tp),)), split=7)
    b += cli.headers(3, req_headers("/a.S/Two"), pad=9)
    b += cli.headers(5, req_headers("/index.html?q=secret", method="GET", grpc=False), end_stream=True)
    b += cli.headers(7, req_headers("/a.S/Gone"))
    b += frame(DATA, END_STREAM, 3, b"x") + frame(DATA, END_STREAM, 1, b"y")
    c.feed(False, b, len(b), 1)
    r = srv.headers(3, [(":status", "200")]) + srv.headers(5, [(":status", "100")])
    r += srv.headers(5, [(":status", "404"), ("content-length", "0")], end_stream=True)
    r += frame(DATA, 0, 3, b"\0" * 40) + frame(RST, 0, 7, b"\0\0\0\x08")
    r += srv.headers(3, [("grpc-status", "14")], end_stream=True)
    r += srv.headers(1, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12")],
                     end_stream=True)   # trailers-only
    c.feed(True, r, len(r), 2)
    got = {ex.path: (ex.method, ex.status, ex.grpc_status, ex.grpc, ex.error, ex.traceparent) for ex in c.exchanges}
    assert got == {"/a.S/Two": ("POST", 200, 14, True, None, None),
                   "/index.html": ("GET", 404, None, False, None, None),
                   "/a.S/Gone": ("POST", 0, None, True, "stream reset", None),
                   "/a.S/One": ("POST", 200, 12, True, None, tp)}
    assert u.counts["h2_reset"] == 1 and sum(u.counts.values()) == 1


def _calls(n: int) -> tuple[bytes, bytes]:
    cli, srv = Peer(), Peer()
    req, resp = PREFACE + SETTINGS_FRAME, SETTINGS_FRAME
    for i in range(n):
        q, r = grpc_call(cli, srv, 1 + 2 * i, f"/pkg.Svc/M{i % 3}", i % 4)
        req, resp = req + q, resp + r
    return req, resp


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_of_the_bytes_gives_the_same_calls(req_cuts: list[int], resp_cuts: list[int]) -> None:
    req, resp = _calls(12)
    c, u = conn()
    for part in _chunks(req, req_cuts):
        c.feed(False, part, len(part), 1)
    for part in _chunks(resp, resp_cuts):
        c.feed(True, part, len(part), 2)
    assert [(ex.path, ex.grpc_status) for ex in c.exchanges] == [(f"/pkg.Svc/M{i % 3}", i % 4) for i in range(12)]
    assert not any(u.counts.values())


def test_bytes_beyond_the_capture_inside_a_frame_are_skipped_by_its_length() -> None:
    cli, srv = Peer(), Peer()
    c, u = conn()
    big = b"\0" + struct.pack(">I", 5000) + b"z" * 5000
    q, r = grpc_call(cli, srv, 1, "/pkg.Svc/Big", message=big)
    c.feed(True, PREFACE + SETTINGS_FRAME, 39, 1)
    head = q.index(b"zzzz") + 10
    c.feed(True, q[:head], len(q), 2)   # captured: the headers and the start of the DATA frame
    r_head = r.index(b"zzzz") + 10
    c.feed(False, r[:r_head], r.index(b"zzzz") + 5000 - 4, 3)   # the rest of the DATA frame missed
    rest = r[r.index(b"zzzz") + 5000 - 4:]
    c.feed(False, rest, len(rest), 4)
    assert names(c) == [(False, "POST", "/pkg.Svc/Big", 200, 0)] and not any(u.counts.values())


def test_a_missed_frame_header_resynchronises_at_the_next_call_and_forgets_the_table() -> None:
    cli, srv = Peer(), Peer()
    c, u = conn()
    c.feed(True, PREFACE + SETTINGS_FRAME, 39, 1)
    q1, r1 = grpc_call(cli, srv, 1, "/pkg.Svc/A")
    q2, r2 = grpc_call(cli, srv, 3, "/pkg.Svc/A")
    both = q1 + q2
    c.feed(True, both[:20], len(both), 2)   # one call: two requests, 20 bytes captured
    c.feed(False, r1 + r2, len(r1 + r2), 3)
    assert u.counts["truncated"] == 1 and u.counts["unmatched_response"] == 2 and c.exchanges == []
    # the client's table is now unknown: stream 5 refers to entries the agent did not see
    q3, r3 = grpc_call(cli, srv, 5, "/pkg.Svc/A")
    c.feed(True, q3, len(q3), 4)
    c.feed(False, r3, len(r3), 5)
    assert c.exchanges == [] and u.counts["h2_unknown_index"] == 1
    # a new method is a literal again: named
    q4, r4 = grpc_call(cli, srv, 7, "/pkg.Svc/New")
    c.feed(True, q4, len(q4), 6)
    c.feed(False, r4, len(r4), 7)
    assert names(c) == [(False, "POST", "/pkg.Svc/New", 200, 0)]


def test_a_connection_seen_from_mid_way_names_only_what_it_can_resolve() -> None:
    cli, srv = Peer(), Peer()
    grpc_call(cli, srv, 1, "/pkg.Svc/Old")   # before the agent: both tables filled
    c, u = conn(whole=None)   # decided by the first bytes
    junk = b"\x00\x00\x00\x00\x05" + b"partial message bytes"   # the end of a message: not a frame chain
    c.feed(True, junk, len(junk), 1)
    assert u.counts["h2_midway"] == 1 and c.whole is False
    # every field of this call is an entry from before: nothing can be named
    q, r = grpc_call(cli, srv, 3, "/pkg.Svc/Old")
    c.feed(True, q, len(q), 2)
    c.feed(False, r, len(r), 3)
    assert c.exchanges == [] and u.counts["h2_unknown_index"] == 1
    # a new method: its :path is a literal; content-type and grpc-status are entries from before,
    # but the request's body is a gRPC message (length-prefixed, filling its DATA frame): a gRPC
    # call whose status is left unknown, never guessed
    q, r = grpc_call(cli, srv, 5, "/pkg.Svc/Fresh")
    c.feed(True, q, len(q), 4)
    c.feed(False, r, len(r), 5)
    assert names(c) == [(False, "POST", "/pkg.Svc/Fresh", 200, None)] and c.exchanges[0].grpc
    assert u.counts["h2_unknown_index"] == 2
    c.exchanges.clear()
    # a plain GET answered from the static table: named
    q = cli.headers(7, [(":method", "GET"), (":path", "/fresh")], end_stream=True)
    r = srv.headers(7, [(":status", "404")], end_stream=True)
    c.feed(True, q, len(q), 6)
    c.feed(False, r, len(r), 7)
    assert names(c) == [(False, "GET", "/fresh", 404, None)] and c.exchanges[0].grpc is False
    assert u.counts["h2_unknown_index"] == 2
    # once the entries seen fill the table, none from before can remain: whole again
    for i in range(40):
        q = cli.headers(9 + 2 * i, [(":method", "GET"), (":path", "/fill"), ("x-fill", f"{i:0>100}")])
        c.feed(True, q, len(q), 8)
    assert c.dirs[1].table.whole and not c.dirs[0].table.whole and len(c.streams) == 40


def test_kernel_losses_and_the_close() -> None:
    cli, srv = Peer(), Peer()
    c, u = conn()
    c.feed(True, PREFACE, 24, 1)
    q, r = grpc_call(cli, srv, 1, "/pkg.Svc/A")
    c.feed(True, q, len(q), 2)
    c.gap()
    c.feed(False, r, len(r), 3)
    assert c.exchanges == [] and u.counts["lost_data"] == 1
    q, _r = grpc_call(cli, srv, 3, "/pkg.Svc/B")
    c.feed(True, q, len(q), 4)
    c.close(9)
    assert [(ex.path, ex.error, ex.end_ns) for ex in c.exchanges] == [("/pkg.Svc/B", "connection closed", 9)]


def test_a_header_block_beyond_max_header_bytes_is_counted_not_kept() -> None:
    cli, srv = Peer(), Peer()
    u = Unparsed(UNPARSED_REASONS)
    c = Http2Connection(u, 256, True)
    c.feed(True, PREFACE, 24, 1)
    q = cli.headers(1, req_headers("/a.B/Big", extra=(("x-big", "v" * 2000),)), split=300)
    c.feed(True, q, len(q), 2)
    assert u.counts["h2_headers_cut"] == 1 and len(c.dirs[1].payload) <= 256 and not c.streams
    # the client's table is unknown now; a new path is a literal, and the call a gRPC one by its
    # message framing: named, with the status from the server's (whole) table
    q, r = grpc_call(cli, srv, 3, "/a.B/Small")
    c.feed(True, q, len(q), 3)
    c.feed(False, r, len(r), 4)
    assert names(c) == [(False, "POST", "/a.B/Small", 200, 0)] and not c.dirs[1].table.whole


@pytest.mark.parametrize("data", [b"\xff" * 64, frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff\x7f"),
                                  frame(CONTINUATION, END_HEADERS, 1, b"\x82")])
def test_garbage_is_counted_never_raised(data: bytes) -> None:
    c, u = conn()
    c.feed(True, PREFACE, 24, 1)
    c.feed(True, data, len(data), 2)
    assert sum(u.counts.values()) >= 1 and c.exchanges == []


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_never_raise(data: bytes, whole: bool) -> None:
    c, _u = conn(whole)
    c.feed(False, data, len(data) + 3, 1)
    c.feed(True, data, len(data), 2)
    c.close(3)


def test_a_connection_found_mid_way_that_never_frames_is_given_up() -> None:
    c, u = conn(whole=None)
    for i in range(MIDWAY_TRIES + 1):
        c.feed(i % 2 == 0, b"\x00\x00\x05\x01\x04\x00\x00\x00\x01 not http/2 after all", 40, i)
    assert c.upgraded and u.counts["h2_midway"] == 1 and c.exchanges == []


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=400)),
                max_size=30),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=30), st.booleans())
def test_cut_captures_and_lost_records_never_misattribute(req_cuts: list[tuple[int, int]], resp_cuts: list[int],
                                                          lose: bool) -> None:
    """Calls split anywhere, each call's capture cut at a random length, records lost: whatever
    is reported is a real call with its own path and status (or no status), never another's."""
    cli, srv = Peer(), Peer()
    truth: dict[int, tuple[str, int]] = {}
    req, resp = PREFACE + SETTINGS_FRAME, SETTINGS_FRAME
    for i in range(12):
        sid, path, status = 1 + 2 * i, f"/pkg.Svc/M{i % 5}", (i * 7) % 17
        truth[sid] = (path, status)
        q, r = grpc_call(cli, srv, sid, path, status)
        req, resp = req + q, resp + r
    c, _u = conn()
    points = sorted({p % (len(req) + 1) for p, _ in req_cuts} | {0, len(req)})
    caps = [cap for _, cap in req_cuts]   # per call: the bytes captured of it
    for n, (a, b) in enumerate(zip(points, points[1:])):
        if b <= a:
            continue
        if lose and n == 3:
            c.gap()
            continue
        part = req[a:b]
        c.feed(False, part[:max(1, caps[n] if n < len(caps) else len(part))], len(part), 1)
    for part in _chunks(resp, resp_cuts):
        c.feed(True, part, len(part), 2)
    for ex in c.exchanges:
        assert isinstance(ex, Http2Exchange)
        path, status = truth[ex.stream_id]
        assert ex.path == path and ex.grpc_status in (status, None) and ex.server, ex


UPGRADE_REQ = (b"GET /ok?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
               b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n")
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


@pytest.mark.parametrize("same_call", [True, False])
@pytest.mark.parametrize("server_side", [True, False])
def test_h2c_upgrade_hands_the_request_to_http2_as_stream_1(same_call: bool, server_side: bool) -> None:
    """curl --http2 on an http:// URL: the HTTP/1.1 request with Upgrade: h2c is answered by a
    101 and then, in HTTP/2, on stream 1; later requests are HTTP/2 streams. The server's
    SETTINGS and stream 1's response may come in the 101's own call or later ones."""
    u = Unparsed(UNPARSED_REASONS)
    h1 = Http1Connection(u, 16384)
    cli, srv = Peer(), Peer()
    req_out = not server_side    # this side sent the requests
    h1.feed(req_out, UPGRADE_REQ, len(UPGRADE_REQ), 10)
    after = SETTINGS_FRAME + srv.headers(1, [(":status", "200"), ("content-type", "text/plain")])
    after += frame(DATA, END_STREAM, 1, b"ok")
    first = SWITCH + after if same_call else SWITCH
    h1.feed(server_side, first, len(first), 20)
    assert h1.upgraded and not h1.exchanges and h1.h2c is not None
    h2 = after_h2c_upgrade(h1, 20)
    if not same_call:
        h2.feed(server_side, after, len(after), 25)
    ex = h2.exchanges.pop()
    assert (ex.method, ex.path, ex.status, ex.version, ex.server) == ("GET", "/ok", 200, "2", server_side)
    assert (ex.start_ns, ex.end_ns) == (10, 25 if not same_call else 20) and ex.traceparent.startswith("00-0af7")
    assert isinstance(ex, Http2Exchange) and ex.grpc is False
    pre = PREFACE + SETTINGS_FRAME + cli.headers(3, req_headers("/two", method="GET", grpc=False), end_stream=True)
    h2.feed(req_out, pre, len(pre), 30)
    resp = srv.headers(3, [(":status", "404")], end_stream=True)
    h2.feed(server_side, resp, len(resp), 40)
    assert [(e.method, e.path, e.status, e.start_ns, e.end_ns) for e in h2.exchanges] == [("GET", "/two", 404, 30, 40)]
    assert not any(u.counts.values())


def test_a_websocket_upgrade_is_no_h2c() -> None:
    h1 = Http1Connection(Unparsed(UNPARSED_REASONS), 16384)
    h1.feed(True, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 60, 1)
    resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + b"\x81\x7e\x00\x10" + b"x" * 16
    h1.feed(False, resp, len(resp), 2)
    assert h1.upgraded and h1.h2c is None and [e.status for e in h1.exchanges] == [101]
    assert not any(h1.unparsed.counts.values())


def test_streaming_calls_many_messages_each_way_with_the_status_from_the_trailers() -> None:
    """Server-, client- and bidi-streaming calls: a stream's many DATA frames (one per message,
    several per call) do not end it; the response's trailers do, with their status (an error
    after some messages too)."""
    cli, srv = Peer(), Peer()
    c, u = conn()
    c.feed(False, PREFACE + SETTINGS_FRAME, len(PREFACE) + 15, 1)
    msg = b"\0\0\0\0\x03abc"
    calls = {1: ("/s.S/ServerStream", 1, 20, 0), 3: ("/s.S/ClientStream", 20, 1, 0), 5: ("/s.S/Bidi", 10, 10, 0),
             7: ("/s.S/BidiFails", 3, 2, 10)}
    ts = 2
    for sid, (path, *_rest) in calls.items():
        b = cli.headers(sid, req_headers(path))
        c.feed(False, b, len(b), ts)
        ts += 1
    for sid in calls:
        b = srv.headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        c.feed(True, b, len(b), ts)
        ts += 1
    for i in range(20):   # messages interleaved across the four streams, one call each
        for sid, (_path, n_req, n_resp, _status) in calls.items():
            if i < n_req:
                last = i == n_req - 1
                c.feed(False, frame(DATA, END_STREAM if last else 0, sid, msg), 17, ts)
            if i < n_resp:
                c.feed(True, frame(DATA, 0, sid, msg), 17, ts)
            ts += 1
    assert not c.exchanges
    for sid, (_path, _q, _r, status) in calls.items():
        b = srv.headers(sid, [("grpc-status", str(status)), ("grpc-message", "x" if status else "")], end_stream=True)
        c.feed(True, b, len(b), ts)
        ts += 1
    got = [(e.path, e.status, e.grpc_status, e.grpc) for e in c.exchanges]   # type: ignore[attr-defined]
    assert got == [(p, 200, s, True) for p, _q, _r, s in calls.values()]
    assert [e.start_ns for e in c.exchanges] == [2, 3, 4, 5] and c.exchanges[-1].end_ns == ts - 1
    assert not any(u.counts.values()) and not c.streams


def test_a_repeated_header_block_is_decoded_against_the_table_as_it_is_now() -> None:
    """Blocks that only read the table are remembered decoded, per table version: the same
    bytes after an insertion refer to another entry."""
    table = HpackTable()
    table.add(b":path", b"/a")
    assert decode_block(table, b"\xbe") == {b":path": b"/a"} == decode_block(table, b"\xbe")
    table.add(b":path", b"/b")
    assert decode_block(table, b"\xbe") == {b":path": b"/b"} and decode_block(table, b"\xbf") == {b":path": b"/a"}
    table.forget()
    assert decode_block(table, b"\xbe") == {b"?": http2._UNKNOWN}
    block = hpack.Encoder().encode([(":path", "/c")])   # a literal with indexing: changes the table
    assert decode_block(table, block) == {b":path": b"/c"} and decode_block(table, b"\xbe") == {b":path": b"/c"}


def test_an_h2c_upgrade_of_an_unreadable_request_reports_nothing_for_stream_1() -> None:
    u = Unparsed(UNPARSED_REASONS)
    h1 = Http1Connection(u, 16384)
    h1.feed(True, UPGRADE_REQ[:10], len(UPGRADE_REQ), 1)   # cut by the capture: a placeholder
    h1.feed(False, SWITCH, len(SWITCH), 2)
    h2 = after_h2c_upgrade(h1, 2)
    srv = Peer()
    after = SETTINGS_FRAME + srv.headers(1, [(":status", "200")], end_stream=True)
    h2.feed(False, after, len(after), 3)
    assert h1.upgraded and not h2.exchanges and not h2.streams
    assert u.counts["unmatched_response"] == 0 and u.counts["truncated"] == 1
