"""HTTP/1.0 and 1.1 (RFC 9112) from captured connection bytes: requests and responses framed
per direction, paired in order per connection.

Each direction is a ``_Stream``: a message head accumulates until its blank line (at most
``max_header_bytes``), then the body is skipped by its framing: ``Content-Length``, chunked
(chunk sizes read, data skipped, trailers read), none (requests; responses to HEAD, 1xx, 204,
304) or to the close (responses without either). Bodies are never kept: only the request line,
the status line and three headers are read (``Content-Length``, ``Transfer-Encoding``,
``traceparent``); ``Authorization``, cookies and every other header are never stored.

Captures are bounded: a call may move more bytes than were captured (``size`` > ``len(data)``).
Bytes of a body need not be seen, only counted. Where the missing bytes held framing (a head,
a chunk size), the message's end is unknown: it is taken to end where the next call in that
direction starts a new message (or at the close), and that is counted as ``truncated``. Pairing
never guesses: a request whose head was cut still takes its place in the queue (as a
placeholder when even its request line is missing), and anything that makes the order uncertain
(records lost in the kernel, more than ``MAX_PENDING`` requests in flight) drops the pending
requests and resynchronises both directions on the next call that starts a message.

``100 Continue`` and other 1xx responses are informational: they do not answer the request. A
``101`` or a successful ``CONNECT`` ends HTTP on the connection (``upgraded``); after a ``101``
with ``Upgrade: h2c`` the request and the rest of the call are kept (``h2c``, ``h2c_rest``) for
the HTTP/2 parser, which continues the connection (``http2.after_h2c_upgrade``).
"""

from __future__ import annotations

import re
from collections import deque

from .base import Exchange, Unparsed

__all__ = ["Http1Connection", "UNPARSED_REASONS", "looks_like_http1", "MAX_PENDING"]

UNPARSED_REASONS = ("not_http", "bad_request_line", "bad_status_line", "bad_content_length",
                    "bad_chunk", "header_too_large", "truncated", "lost_data", "unmatched_response",
                    "pipeline_overflow", "closed_mid_message")
MAX_PENDING = 64   # requests in flight on one connection (pipelining) before it is resynchronised

_METHOD = re.compile(rb"[A-Z][A-Z-]{0,15} ")
_METHOD_PREFIX = re.compile(rb"[A-Z][A-Z-]{0,15}")
_HEADERS = re.compile(rb"\r\n(content-length|transfer-encoding|traceparent)[ \t]*:[ \t]*([^\r\n]*)", re.I)
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")
_NO_BODY_STATUS = frozenset({204, 304})
_H2C = re.compile(rb"\r\nupgrade[ \t]*:[ \t]*h2c[ \t]*\r", re.I)

(_START, _HEAD, _BODY, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _SKIP,
 _RESYNC, _DONE) = range(11)


def looks_like_http1(data: bytes) -> bool:
    """Whether ``data`` starts like an HTTP/1 request line or status line."""
    return data.startswith(b"HTTP/1.") or _METHOD.match(data) is not None


class _Stream:
    """One direction of a connection: requests (``request``) or responses."""

    __slots__ = ("conn", "request", "state", "buf", "left", "msg_ts", "last_ts", "chunked")

    def __init__(self, conn: "Http1Connection", request: bool):
        self.conn = conn
        self.request = request
        self.state = _START
        self.buf = bytearray()
        self.left = 0          # body or chunk bytes still to come
        self.msg_ts = 0        # first byte of the message in progress
        self.last_ts = 0       # last record of this direction
        self.chunked = False

    def starts_message(self, data: bytes) -> bool:
        if self.request:
            return _METHOD.match(data) is not None
        return data.startswith(b"HTTP/1.")

    def resync(self) -> None:
        self.state = _RESYNC
        self.buf.clear()

    # ------------------------------------------------------------------ bytes in

    def feed(self, data: bytes, size: int, ts: int) -> None:
        st = self.state
        if st == _DONE:
            return
        if st == _SKIP or st == _RESYNC:
            if not self.starts_message(data):
                if st == _SKIP:
                    self.last_ts = ts   # more of a message whose end is unknown
                return
            if st == _SKIP:
                self._end()
            self.state = _START
        self.last_ts = ts
        pos, n = 0, len(data)
        while pos < n:
            st = self.state
            if st == _START:   # (buf is empty here: every way out of a head clears it)
                self.msg_ts = ts
                self.state = st = _HEAD
            if st == _HEAD:
                pos = self._head(data, pos)
            elif st == _BODY:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
                if self.left == 0:
                    self._end()
            elif st == _CHUNK_DATA:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
                if self.left == 0:
                    self.state, self.left = _CHUNK_END, 2
            elif st == _CHUNK_END:
                take = min(self.left, n - pos)
                if data[pos:pos + take] != b"\r\n"[2 - self.left:2 - self.left + take]:
                    self._framing_lost("bad_chunk")
                    return
                pos += take
                self.left -= take
                if self.left == 0:
                    self.state = _CHUNK_SIZE_LINE
            elif st == _CHUNK_SIZE_LINE or st == _TRAILER:
                pos = self._line(data, pos)
            else:   # _UNTIL_CLOSE, _SKIP, _RESYNC, _DONE: the rest of this call is not framed
                if st == _DONE and self.conn.h2c is not None:
                    self.conn.h2c_rest = (data[pos:], size - pos)   # HTTP/2 after the 101, same call
                return
        gap = size - n
        if gap > 0:
            self._gap(gap)

    def _gap(self, gap: int) -> None:
        """``gap`` bytes moved beyond the capture, after what was fed."""
        st = self.state
        if st == _BODY or st == _CHUNK_DATA:
            if gap < self.left:
                self.left -= gap
            elif gap == self.left:
                self.left = 0
                if st == _BODY:
                    self._end()
                else:
                    self.state, self.left = _CHUNK_END, 2
            else:                        # the next message started inside the hole
                self.left = 0
                self._framing_lost("truncated")
        elif st == _HEAD:
            self.conn.unparsed.add("truncated")
            self._head_cut()
        elif st == _START:               # a message started inside the hole: unseen
            self.conn.unparsed.add("truncated")
            if self.request:
                self.conn.placeholder(self.msg_ts)
                self.state = _SKIP
            else:
                self.conn.desync()
        elif st in (_CHUNK_SIZE_LINE, _CHUNK_END, _TRAILER):
            self._framing_lost("truncated")

    def _framing_lost(self, reason: str) -> None:
        """The end of the message in progress is unknown from here on."""
        self.conn.unparsed.add(reason)
        self.state = _SKIP
        self.buf.clear()

    # ------------------------------------------------------------------ heads

    def _head(self, data: bytes, pos: int) -> int:
        buf = self.buf
        old = len(buf)
        if not old:   # the usual case: the whole head in this call, parsed without copying it twice
            end = data.find(b"\r\n\r\n", pos)
            if end >= 0 and end - pos <= self.conn.max_header_bytes:
                if not self.starts_message(data[pos:pos + 17]):
                    return self._bad_start(len(data))
                self._parse(data[pos:end + 2])
                return end + 4
        buf += data[pos:]
        end = buf.find(b"\r\n\r\n", max(0, old - 3))
        if len(buf) >= 8 or end >= 0 or b"\n" in buf:
            if not self.starts_message(bytes(buf[:17])):
                return self._bad_start(len(data))
        if end < 0:
            if len(buf) > self.conn.max_header_bytes:
                self.conn.unparsed.add("header_too_large")
                self._head_cut()
                return len(data)
            return len(data)
        head = bytes(buf[:end + 2])
        consumed = end + 4 - old    # bytes of this call that belonged to the head
        buf.clear()
        self._parse(head)
        return pos + consumed

    def _bad_start(self, n: int) -> int:
        """A message should start here and does not: counted, and this direction resynchronises."""
        reason = "not_http" if not self.conn.parsed else "bad_request_line" if self.request else "bad_status_line"
        self.conn.unparsed.add(reason)
        if not self.request and self.conn.current is not None:
            self.conn.current = None   # the answer of a popped request is unreadable
        self.resync()
        return n

    def _head_cut(self) -> None:
        """The head in progress will not be seen whole (capture gap or too large): what its
        first line says is kept, its framing is not."""
        buf = self.buf
        eol = buf.find(b"\r\n")
        first = bytes(buf[:eol]) if eol >= 0 else b""
        buf.clear()
        self.state = _SKIP
        if self.request:
            parts = first.split(b" ")
            if len(parts) == 3 and parts[2] in (b"HTTP/1.1", b"HTTP/1.0"):
                self.conn.request_head(self.msg_ts, parts[0], parts[1], parts[2][5:], None)
            else:
                self.conn.placeholder(self.msg_ts)
        else:
            parts = first.split(b" ", 2)
            status = _status(parts)
            if status and status >= 200:
                self.conn.response_head(status)
            elif status is None:
                self.conn.drop_current()

    def _parse(self, head: bytes) -> None:
        conn = self.conn
        eol = head.find(b"\r\n")
        first = head[:eol]
        length: int | None = None
        chunked = False
        traceparent = None
        for name, value in _HEADERS.findall(head, eol):
            key = name.lower()
            if key == b"content-length":
                v = value.strip()
                if not v.isdigit() or (length is not None and int(v) != length):
                    conn.unparsed.add("bad_content_length")
                    if self.request:
                        conn.placeholder(self.msg_ts)
                        self.state = _SKIP
                    else:
                        conn.drop_current()
                        self.resync()
                    return
                length = int(v)
            elif key == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif len(value) <= 64:
                traceparent = value.strip().decode("ascii", "replace")
        conn.parsed = True
        if self.request:
            parts = first.split(b" ")
            if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
                conn.unparsed.add("bad_request_line")
                conn.placeholder(self.msg_ts)
                self.state = _SKIP
                return
            conn.request_head(self.msg_ts, parts[0], parts[1], parts[2][5:], traceparent)
            self._frame(chunked, length, 0)
            return
        parts = first.split(b" ", 2)
        status = _status(parts)
        if status is None:
            conn.unparsed.add("bad_status_line")
            conn.drop_current()
            self.resync()
            return
        if status < 200:
            if status == 101:
                conn.response_head(status)
                if _H2C.search(head):   # the request goes on as HTTP/2 stream 1 (http2.after_h2c_upgrade)
                    conn.h2c, conn.current = conn.current, None
                self.state = _START
                self._end()
                conn.upgrade()
                self.state = _DONE   # what follows the head is the new protocol's
            else:   # 100 Continue, 102, 103: the final response follows
                self.state = _START
            return
        method = conn.response_head(status)
        if method == b"CONNECT" and status < 300:
            self.state = _START
            self._end()
            conn.upgrade()
            return
        if method == b"HEAD" or status in _NO_BODY_STATUS:
            self._frame(False, 0, 0)
        else:
            self._frame(chunked, length, None)

    def _frame(self, chunked: bool, length: int | None, default: int | None) -> None:
        """Body framing after a head: chunked, a length, or ``default`` (None: to the close)."""
        if chunked:
            self.state = _CHUNK_SIZE_LINE
            self.chunked = True
            return
        self.chunked = False
        if length is None:
            length = default
        if length is None:
            self.state = _UNTIL_CLOSE
        elif length == 0:
            self._end()
        else:
            self.state, self.left = _BODY, length

    def _line(self, data: bytes, pos: int) -> int:
        """A chunk-size line, or a trailer line."""
        buf = self.buf
        eol = data.find(b"\n", pos)
        if eol < 0:
            buf += data[pos:]
            if len(buf) > 1024:
                self._framing_lost("bad_chunk")
            return len(data)
        buf += data[pos:eol + 1]
        line = bytes(buf).rstrip(b"\r\n")
        buf.clear()
        if self.state == _TRAILER:
            if not line:
                self._end()
            return eol + 1
        m = _CHUNK_SIZE.match(line)
        if m is None:
            self._framing_lost("bad_chunk")
            return len(data)
        size = int(m.group(), 16)
        if size == 0:
            self.state = _TRAILER
        else:
            self.state, self.left = _CHUNK_DATA, size
        return eol + 1

    # ------------------------------------------------------------------ message ends

    def _end(self) -> None:
        self.state = _START
        if not self.request:
            self.conn.response_end(self.last_ts)

    def close(self) -> None:
        if self.state == _UNTIL_CLOSE or self.state == _SKIP:
            self._end()


def _status(parts: list[bytes]) -> int | None:
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or not b"100" <= code <= b"599":
        return None
    return int(code)


class Http1Connection:
    """One TCP connection's HTTP/1 traffic, from one side. ``feed`` the bytes of each call in
    order (``outgoing``: this side sent them); completed exchanges collect in ``exchanges``
    (the caller empties it). Which side is the server is learnt from the first message: the
    side that receives requests."""

    __slots__ = ("unparsed", "max_header_bytes", "exchanges", "server", "requests", "responses",
                 "pending", "current", "parsed", "upgraded", "early", "h2c", "h2c_rest")

    def __init__(self, unparsed: Unparsed, max_header_bytes: int = 16384):
        self.unparsed = unparsed
        self.max_header_bytes = max_header_bytes
        self.exchanges: list[Exchange] = []
        self.server: bool | None = None     # None until the first message says
        self.requests = _Stream(self, True)
        self.responses = _Stream(self, False)
        self.pending: deque[Exchange] = deque()
        self.current: Exchange | None = None   # the request whose response is being read
        self.parsed = False                     # a message was parsed (else bad input is not_http)
        self.upgraded = False                   # no longer HTTP/1 (101, CONNECT)
        self.early: tuple[bool, bytes, int] | None = None   # (outgoing, bytes, time) of a short first call
        self.h2c: Exchange | None = None          # the request a 101 with Upgrade: h2c answered
        self.h2c_rest: tuple[bytes, int] | None = None   # (bytes, size) of that call after the 101's head

    def feed(self, outgoing: bool, data: bytes, size: int, ts: int) -> None:
        if self.upgraded:
            return
        if self.server is None:
            early, self.early = self.early, None
            if early is not None and early[0] == outgoing:   # a first call too short to tell
                data, size, ts = early[1] + data, size + len(early[1]), early[2]
            if _METHOD.match(data):
                self.server = not outgoing
            elif data.startswith(b"HTTP/1."):
                self.server = outgoing
            elif size == len(data) < 17 and (_METHOD_PREFIX.fullmatch(data) or b"HTTP/1."[:len(data)] == data):
                self.early = (outgoing, data, ts)
                return
            else:
                self.unparsed.add("not_http")
                return
        if outgoing != self.server:
            self.requests.feed(data, size, ts)
        else:
            self.responses.feed(data, size, ts)

    def gap(self) -> None:
        """Records of this connection were lost in the kernel: resynchronise."""
        self.unparsed.add("lost_data")
        self.desync()

    def close(self, ts: int) -> None:
        """The connection closed: a response delimited by the close ends; requests still
        waiting for an answer end without one."""
        self.responses.close()
        self.requests.close()
        left = ([self.current] if self.current is not None else []) + list(self.pending)
        for ex in left:
            if ex.method:
                self.unparsed.add("closed_mid_message")
                ex.error = "connection closed" if ex.status == 0 else "response cut by the close"
                ex.end_ns = max(ts if ex.status == 0 else self.responses.last_ts, ex.start_ns)
                self.exchanges.append(ex)
        self.current = None
        self.pending.clear()
        self.requests.state = self.responses.state = _DONE

    # ------------------------------------------------------------------ pairing (from the streams)

    def desync(self) -> None:
        self.pending.clear()
        self.current = None
        self.requests.resync()
        self.responses.resync()

    def request_head(self, ts: int, method: bytes, target: bytes, version: bytes, traceparent: str | None) -> None:
        if self.responses.state == _SKIP and self.current is not None:
            self.responses._end()   # the previous answer (end unknown) is over: a new request came
        if len(self.pending) >= MAX_PENDING:
            self.unparsed.add("pipeline_overflow")
            self.desync()
            return
        q = target.find(b"?")
        path = target[:q] if q >= 0 else target
        if path[:1] != b"/" and b"://" in path:   # absolute form (to a proxy): its path only
            rest = path.split(b"://", 1)[1]
            s = rest.find(b"/")
            path = rest[s:] if s >= 0 else b"/"
        self.pending.append(Exchange(bool(self.server), ts, method.decode("ascii", "replace"),
                                     path.decode("utf-8", "replace"), version.decode("ascii"), traceparent))

    def placeholder(self, ts: int) -> None:
        """A request that was seen to start but cannot be read: it keeps its place in the queue
        (its response is matched to it and dropped)."""
        if len(self.pending) >= MAX_PENDING:
            self.unparsed.add("pipeline_overflow")
            self.desync()
            return
        self.pending.append(Exchange(bool(self.server), ts, "", "", "", None))

    def response_head(self, status: int) -> bytes | None:
        """A final (or 101) response starts: it answers the oldest pending request. Returns that
        request's method (it decides whether the response has a body)."""
        if self.current is not None:   # a previous response whose end was unknown
            self.response_end(self.responses.last_ts)
        if not self.pending:
            self.unparsed.add("unmatched_response")
            return None
        ex = self.current = self.pending.popleft()
        ex.status = status
        return ex.method.encode()

    def drop_current(self) -> None:
        """A response started whose status cannot be read: its request gets no exchange."""
        if self.current is None and self.pending:
            self.pending.popleft()
        self.current = None

    def response_end(self, ts: int) -> None:
        ex = self.current
        if ex is None:
            return
        self.current = None
        if ex.method:
            ex.end_ns = max(ts, ex.start_ns)
            self.exchanges.append(ex)

    def upgrade(self) -> None:
        self.upgraded = True
        self.pending.clear()
