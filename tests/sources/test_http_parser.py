"""HTTP/1 framing and pairing without BPF (receiver/protocols/http1.py): messages split across
calls at every byte, pipelining, chunked bodies, 100-continue, truncated captures, connections
closed mid-message, and bad input counted per reason, never raised."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.protocols import UNPARSED_REASONS, Exchange, Http1Connection, Unparsed, detect
from receiver.protocols.http1 import MAX_PENDING

from ..harness import examples

REQ_OUT, REQ_IN = True, False   # the client sends requests; the server receives them


def conn() -> Http1Connection:
    return Http1Connection(Unparsed(UNPARSED_REASONS), max_header_bytes=4096)


def feed(c: Http1Connection, outgoing: bool, data: bytes, ts: int, size: int | None = None) -> None:
    c.feed(outgoing, data, len(data) if size is None else size, ts)


def summary(exchanges: list[Exchange]) -> list[tuple[str, str, int, str | None]]:
    return [(e.method, e.path, e.status, e.error) for e in exchanges]


def nonzero(c: Http1Connection) -> dict[str, int]:
    return {k: v for k, v in c.unparsed.counts.items() if v}


GET = b"GET /a?token=x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer secret\r\nCookie: sid=1\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_server_side_request_and_response() -> None:
    c = conn()
    feed(c, REQ_IN, GET, 10)
    feed(c, True, OK, 25)
    assert summary(c.exchanges) == [("GET", "/a", 200, None)]
    ex = c.exchanges[0]
    assert ex.server and (ex.start_ns, ex.end_ns) == (10, 25) and ex.version == "1.1"
    assert not nonzero(c)
    assert not [s for s in ex.__slots__ if "secret" in str(getattr(ex, s)) or "sid" in str(getattr(ex, s))]


def test_client_side_is_a_client() -> None:
    c = conn()
    feed(c, REQ_OUT, GET, 1)
    feed(c, False, OK, 2)
    assert c.exchanges[0].server is False and summary(c.exchanges) == [("GET", "/a", 200, None)]


CONVERSATION = [
    (True, b"POST /upload HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"),
    (False, b"HTTP/1.1 100 Continue\r\n\r\n"),
    (True, b"hello world"),
    (False, b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"),
    (True, b"GET /one HTTP/1.1\r\n\r\nHEAD /two HTTP/1.1\r\n\r\nGET /three?x HTTP/1.1\r\n"
           b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"),
    (False, b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnf!"
            b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"          # HEAD: no body whatever the length
            b"HTTP/1.1 204 No Content\r\n\r\n"),
    (True, b"DELETE /x HTTP/1.0\r\n\r\n"),
    (False, b"HTTP/1.0 500 Oops\r\n\r\nbody to the close"),
]
EXPECTED = [("POST", "/upload", 201, None), ("GET", "/one", 404, None), ("HEAD", "/two", 200, None),
            ("GET", "/three", 204, None), ("DELETE", "/x", 500, None)]


def run(conversation: list[tuple[bool, bytes]], split: list[int] | None = None) -> Http1Connection:
    """Feeds a client-side conversation, each message cut into calls at ``split`` offsets."""
    c = conn()
    ts = 0
    for outgoing, data in conversation:
        cuts = sorted({0, len(data), *[s % (len(data) + 1) for s in (split or [])]})
        for a, b in zip(cuts, cuts[1:]):
            ts += 1
            feed(c, outgoing, data[a:b], ts)
    c.close(ts + 1)
    return c


def test_pipelining_chunked_100_continue_head_204_and_close_delimited() -> None:
    c = run(CONVERSATION)
    assert summary(c.exchanges) == EXPECTED
    assert c.exchanges[3].traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert c.exchanges[0].end_ns > c.exchanges[0].start_ns
    assert not nonzero(c)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 400), max_size=6))
def test_any_split_of_the_messages_gives_the_same_exchanges(split: list[int]) -> None:
    c = run(CONVERSATION, split)
    assert summary(c.exchanges) == EXPECTED
    assert not nonzero(c)


def test_every_single_byte_split() -> None:
    c = conn()
    ts = 0
    for outgoing, data in CONVERSATION:
        for i in range(len(data)):
            ts += 1
            feed(c, outgoing, data[i:i + 1], ts)
    c.close(ts)
    assert summary(c.exchanges) == EXPECTED


def test_response_end_time_is_its_last_byte() -> None:
    c = conn()
    feed(c, REQ_OUT, b"GET / HTTP/1.1\r\n\r\n", 100)
    feed(c, False, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", 200)
    assert not c.exchanges
    feed(c, False, b"56789", 300)
    assert [(e.start_ns, e.end_ns) for e in c.exchanges] == [(100, 300)]


def test_truncated_body_capture_keeps_framing() -> None:
    """Only the first bytes of each call are captured: a body is counted, not seen."""
    c = conn()
    head = b"POST /big HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"
    feed(c, REQ_OUT, head + b"xxxx", 1, size=len(head) + 5000)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    feed(c, False, head + b"yy", 2, size=len(head) + 60000)
    feed(c, False, b"y" * 10, 3, size=40000)
    feed(c, REQ_OUT, b"GET /next HTTP/1.1\r\n\r\n", 3)
    feed(c, False, b"HTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n", 4)
    assert summary(c.exchanges) == [("POST", "/big", 200, None), ("GET", "/next", 404, None)]
    assert not nonzero(c)


def test_truncated_head_keeps_the_request_line_and_the_pairing() -> None:
    c = conn()
    head = b"GET /long HTTP/1.1\r\nX-Pad: " + b"p" * 200
    feed(c, REQ_OUT, head, 1, size=len(head) + 3000)    # the rest of the head was not captured
    feed(c, False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2)
    feed(c, REQ_OUT, b"GET /after HTTP/1.1\r\n\r\n", 3)
    feed(c, False, b"HTTP/1.1 201 OK\r\nContent-Length: 2\r\n\r\nok", 4)
    assert summary(c.exchanges) == [("GET", "/long", 200, None), ("GET", "/after", 201, None)]
    assert nonzero(c) == {"truncated": 1}


def test_request_line_cut_by_the_capture_is_a_placeholder_never_a_wrong_pair() -> None:
    c = conn()
    feed(c, REQ_OUT, b"GET /very-long-pa", 1, size=3000)
    feed(c, False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2)
    feed(c, REQ_OUT, b"GET /b HTTP/1.1\r\n\r\n", 3)
    feed(c, False, b"HTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n", 4)
    assert summary(c.exchanges) == [("GET", "/b", 404, None)]   # the first response answered the placeholder
    assert nonzero(c) == {"truncated": 1}


def test_pipelined_request_inside_the_capture_gap_keeps_its_place() -> None:
    c = conn()
    first = b"GET /1 HTTP/1.1\r\n\r\n"
    feed(c, REQ_OUT, first, 1, size=len(first) + 40)   # a second request, not captured
    feed(c, False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 500 E\r\nContent-Length: 0\r\n\r\n", 2)
    feed(c, REQ_OUT, b"GET /3 HTTP/1.1\r\n\r\n", 3)
    feed(c, False, b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n", 4)
    assert summary(c.exchanges) == [("GET", "/1", 200, None), ("GET", "/3", 202, None)]


def test_closed_mid_message() -> None:
    c = conn()
    feed(c, REQ_IN, b"GET /slow HTTP/1.1\r\n\r\nGET /cut HTTP/1.1\r\n\r\n", 1)
    feed(c, True, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123", 2)
    c.close(9)
    assert summary(c.exchanges) == [("GET", "/slow", 200, "response cut by the close"),
                                    ("GET", "/cut", 0, "connection closed")]
    assert c.exchanges[1].end_ns == 9
    assert nonzero(c) == {"closed_mid_message": 2}
    feed(c, REQ_IN, b"GET /late HTTP/1.1\r\n\r\n", 10)   # nothing after the close
    assert len(c.exchanges) == 2


def test_lost_records_resynchronise_on_the_next_message() -> None:
    c = conn()
    feed(c, REQ_OUT, b"GET /1 HTTP/1.1\r\n\r\n", 1)
    c.gap()                      # the kernel lost records of this connection
    feed(c, False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2)
    feed(c, REQ_OUT, b"tail of a body", 3)
    feed(c, REQ_OUT, b"GET /2 HTTP/1.1\r\n\r\n", 4)
    feed(c, False, b"HTTP/1.1 204 OK\r\n\r\n", 5)
    assert summary(c.exchanges) == [("GET", "/2", 204, None)]
    assert nonzero(c) == {"lost_data": 1, "unmatched_response": 1}   # /1's answer: never paired


def test_upgrade_ends_http() -> None:
    c = conn()
    feed(c, REQ_OUT, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1)
    feed(c, False, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello", 2)
    feed(c, REQ_OUT, b"\x81\x85binary frames", 3)
    assert summary(c.exchanges) == [("GET", "/ws", 101, None)] and c.upgraded
    assert not nonzero(c)


def test_garbage_is_counted_per_reason_never_raised() -> None:
    c = conn()
    feed(c, REQ_IN, bytes(range(256)), 1)
    assert nonzero(c) == {"not_http": 1} and c.server is None
    c = conn()
    feed(c, REQ_IN, b"GET / HTTP/1.1\r\n\r\n", 1)
    feed(c, True, b"HTTP/1.1 2xx Bad\r\n\r\n", 2)
    feed(c, REQ_IN, b"\x16\x03\x01 binary", 3)
    feed(c, True, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 4)
    assert not c.exchanges
    assert nonzero(c) == {"bad_status_line": 1, "bad_request_line": 1, "unmatched_response": 1}
    c = conn()
    feed(c, REQ_IN, b"GET / HTTP/1.1\r\nX: " + b"a" * 5000, 1)
    assert nonzero(c) == {"header_too_large": 1}
    c = conn()
    feed(c, REQ_OUT, b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 1)
    feed(c, False, b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n", 2)
    assert not c.exchanges and nonzero(c) == {"bad_content_length": 1}
    c = conn()
    feed(c, REQ_OUT, b"GET / HTTP/1.1\r\n\r\n", 1)
    feed(c, False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 2)
    assert nonzero(c) == {"bad_chunk": 1}


def test_pipeline_overflow_resynchronises() -> None:
    c = conn()
    feed(c, REQ_OUT, b"GET / HTTP/1.1\r\n\r\n" * (MAX_PENDING + 1), 1)
    assert nonzero(c) == {"pipeline_overflow": 1} and not c.pending


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300), st.integers(0, 500)), max_size=12))
def test_arbitrary_input_never_raises(calls: list[tuple[bool, bytes, int]]) -> None:
    c = conn()
    for i, (outgoing, data, extra) in enumerate(calls):
        c.feed(outgoing, b"GET / HTTP/1.1\r\n" + data if i == 0 else data, len(data) + extra, i)
    c.close(len(calls))
    for e in c.exchanges:
        assert e.method and e.end_ns >= e.start_ns


def test_detect() -> None:
    assert detect(b"GET / HTTP/1.1") == "http1" and detect(b"HTTP/1.1 200") == "http1"
    assert detect(b"PRI * HTTP/2.0") == "http2"   # the HTTP/2 preface (receiver/protocols/http2.py)
    assert detect(b"\x16\x03\x01") is None and detect(b"get / HTTP/1.1") is None
