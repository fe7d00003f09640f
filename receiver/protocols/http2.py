"""HTTP/2 (RFC 9113) and its headers (HPACK, RFC 7541) from captured connection bytes: one
``Exchange`` per stream, gRPC calls among them.

Each direction of a connection is framed on its own (9-byte frame headers give every length),
its header blocks (HEADERS + CONTINUATION, possibly split across calls) decoded with the
direction's own HPACK dynamic table, kept across requests for the connection's life. Streams
interleave freely: a stream's exchange starts at its request's HEADERS and ends at the
END_STREAM of its response (DATA or trailers), or at an RST_STREAM. Only ``:method``,
``:path``, ``:status``, ``content-type``, ``grpc-status`` and ``traceparent`` are kept; every
other header only passes through the dynamic table (``authorization`` and cookies are never
stored elsewhere). Huffman decoding and the static table are the python-hyper ``hpack``
package's; the dynamic table is ours, because it must survive not knowing its start.

Captures are bounded (the first ``capture_bytes`` of each call). Bytes of a frame that were not
captured are skipped by its length; a header block cut by the capture cannot be decoded: its
stream is dropped and counted (``h2_headers_cut``), and the dynamic table becomes unknown. When
the capture misses a frame header (a call that moved several frames beyond the capture) the
direction resynchronises at the next call that starts with a plausible frame header
(``truncated``). A larger capture keeps the framing through coalesced reads and writes and
decodes larger header blocks.

A connection seen from mid-way (its preface not seen, or records lost in the kernel) has an
unknown dynamic table: references to entries inserted before the agent saw them cannot be
resolved. Entries inserted later are known (newest entries have the lowest indices), so streams
whose headers use only the static table, literals and those entries are named; a stream whose
``:path``, ``:method`` or ``:status`` refers to an unknown entry is dropped and counted
(``h2_unknown_index``), never named after a guess. Once the known entries fill the table, no
unknown entry can remain and the table is whole again.

h2c by upgrade (``curl --http2`` on an http:// URL): the HTTP/1 parser reads the request with
``Upgrade: h2c`` and the ``101``, then hands over (``after_h2c_upgrade``): the request becomes
stream 1, answered in HTTP/2 like any other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import ValuesView
from typing import Protocol

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from .base import Exchange, Unparsed

__all__ = ["Http2Connection", "Http2Exchange", "UNPARSED_REASONS", "looks_like_http2", "starts_with_headers",
           "PREFACE", "MAX_STREAMS", "after_h2c_upgrade",
           "HpackTable", "decode_block"]

UNPARSED_REASONS = ("h2_bad_frame", "h2_bad_hpack", "h2_unknown_index", "h2_headers_cut", "h2_stream_overflow",
                    "h2_reset", "h2_midway")
MIDWAY_TRIES = 16   # calls of a connection found mid-way without a plausible frame before it is given up
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 256            # open streams per connection; beyond, new ones are counted and dropped
MAX_TABLE_SIZE = 1 << 16     # the largest dynamic table followed (the default is 4096)
MAX_DECODED = 16             # header blocks remembered decoded per table
MAX_FRAME = (1 << 24) - 1

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONTINUATION = range(10)
_END_STREAM, _END_HEADERS, _PADDED, _PRIO = 0x1, 0x4, 0x8, 0x20
_STATIC = HeaderTable.STATIC_TABLE
_N_STATIC = len(_STATIC)
_KEPT = frozenset({b":method", b":path", b":status", b"content-type", b"grpc-status", b"traceparent"})
_UNKNOWN = object()   # a header whose entry is not known
_UNKNOWN_NAME = b"\0?"  # the name of a dynamic entry added under an unknown name (no real name has a NUL)


def looks_like_http2(data: bytes) -> bool:
    """Whether ``data`` starts a connection's HTTP/2 bytes: the client preface (or its start), or
    a SETTINGS frame on stream 0 (what a server sends first)."""
    if data[:14] == PREFACE[:14] or (len(data) < 14 and data and PREFACE.startswith(data)):
        return True
    return (len(data) >= 9 and data[3] == _SETTINGS and data[4] in (0, 1) and data[5:9] == b"\0\0\0\0"
            and int.from_bytes(data[:3], "big") % 6 == 0 and int.from_bytes(data[:3], "big") <= 16384)


def starts_with_headers(data: bytes) -> bool:
    """Whether ``data`` starts with a whole HEADERS frame on a client-initiated stream (as the
    program checks): an HTTP/2 connection found mid-way, at a request or response."""
    if len(data) < 9 or data[3] != _HEADERS or not data[4] & _END_HEADERS or data[4] & 0xD2 or data[5] & 0x80:
        return False
    length = int.from_bytes(data[:3], "big")
    return data[8] & 1 == 1 and 0 < length <= 16384


class Http2Exchange(Exchange):
    """An HTTP/2 stream: an ``Exchange`` with what gRPC needs."""

    __slots__ = ("grpc", "grpc_status", "stream_id", "unknown")

    def __init__(self, server: bool, start_ns: int, method: str, path: str, traceparent: str | None,
                 grpc: bool | None, stream_id: int):
        super().__init__(server, start_ns, method, path, "2", traceparent)
        self.grpc = grpc                      # content-type application/grpc* (None: not known yet)
        self.grpc_status: int | None = None   # from the trailers (or a trailers-only response)
        self.stream_id = stream_id
        self.unknown = False                  # a response header referred to an unknown entry


class HpackTable:
    """One direction's dynamic table. ``whole`` is False while entries older than the known
    ones may exist (the connection was seen from mid-way, or bytes were lost)."""

    __slots__ = ("entries", "size", "max_size", "whole", "version", "decoded")

    def __init__(self, whole: bool = True):
        self.entries: deque[tuple[bytes, bytes, int]] = deque()   # newest first
        self.size = 0
        self.max_size = 4096
        self.whole = whole
        self.version = 0   # changes with the table
        # Header blocks that only read the table, decoded while it was at a version: a peer
        # repeats the same block (a response's headers, OK trailers) call after call.
        self.decoded: dict[bytes, tuple[int, dict[bytes, object]]] = {}

    def forget(self) -> None:
        self.entries.clear()
        self.size = 0
        self.whole = False
        self.version += 1

    def get(self, index: int) -> tuple[bytes, bytes] | None:
        """The entry at an HPACK index, None when it is unknown; raises ValueError when it cannot
        exist."""
        if 0 < index <= _N_STATIC:
            return _STATIC[index - 1]
        i = index - _N_STATIC - 1
        if 0 <= i < len(self.entries):
            e = self.entries[i]
            return None if e[0] == _UNKNOWN_NAME else (e[0], e[1])
        if index == 0 or self.whole:
            raise ValueError(f"index {index}")
        return None

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        n = len(name) + len(value) + 32
        self.entries.appendleft((name, value, n))
        self.size += n
        self._evict()

    def resize(self, size: int) -> None:
        if size > MAX_TABLE_SIZE:
            raise ValueError(f"table size {size}")
        self.version += 1
        self.max_size = size
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.entries:
            self.size -= self.entries.pop()[2]
        if not self.whole and self.size + 32 > self.max_size:
            self.whole = True   # the known entries leave no room for an unknown one


def _integer(data: bytes, pos: int, bits: int) -> tuple[int, int]:
    mask = (1 << bits) - 1
    v = data[pos] & mask
    pos += 1
    if v < mask:
        return v, pos
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        v += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos
        if shift > 28:
            raise ValueError("integer too long")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    huff = data[pos] & 0x80
    n, pos = _integer(data, pos, 7)
    end = pos + n
    if end > len(data):
        raise ValueError("string beyond the block")
    s = data[pos:end]
    return (decode_huffman(s) if huff else s), end


def decode_block(table: HpackTable, block: bytes) -> dict[bytes, object]:
    """The kept headers of one header block (``_UNKNOWN`` as the value of a kept name whose
    value is an unknown entry; a name that is unknown is skipped), updating ``table``. Raises
    ValueError (or IndexError) on a malformed block; ``table`` is then unreliable. The result is
    shared with later decodes of the same block (it is not to be changed)."""
    version = table.version
    hit = table.decoded.get(block)
    if hit is not None and hit[0] == version:
        return hit[1]
    out: dict[bytes, object] = {}
    pos, n = 0, len(block)
    unknown_name = False
    while pos < n:
        b = block[pos]
        if b & 0x80:                      # indexed field
            idx, pos = _integer(block, pos, 7)
            e = table.get(idx)
            if e is None:
                unknown_name = True
            elif e[0] in _KEPT:
                out[e[0]] = e[1]
            continue
        if b & 0xE0 == 0x20:              # dynamic table size update
            size, pos = _integer(block, pos, 5)
            table.resize(size)
            continue
        add = bool(b & 0x40)              # literal with incremental indexing (else without/never)
        idx, pos = _integer(block, pos, 6 if add else 4)
        if idx:
            e = table.get(idx)
            name = e[0] if e is not None else None
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        if name is None:
            unknown_name = True
        elif name in _KEPT:
            out[name] = value
        if add:
            table.add(_UNKNOWN_NAME if name is None else name, value)   # unknown names keep their place
    if unknown_name:
        out[b"?"] = _UNKNOWN
    if table.version == version:   # the block only read the table
        if len(table.decoded) >= MAX_DECODED:
            table.decoded.clear()
        table.decoded[block] = (version, out)
    return out


class _Direction:
    """One direction's framing: frame header, payload, the header block being assembled."""

    __slots__ = ("hdr", "left", "ftype", "fflags", "sid", "payload", "cut", "block", "block_sid",
                 "block_flags", "table", "synced", "preface", "fresh", "last_ts", "max_frame", "flen")

    def __init__(self, whole: bool):
        self.hdr = bytearray()
        self.left = 0            # payload bytes of the current frame still to come
        self.ftype = -1          # -1: between frames
        self.fflags = 0
        self.sid = 0
        self.payload = bytearray()   # of HEADERS, CONTINUATION and RST_STREAM frames
        self.cut = False         # the current frame's payload was not all captured
        self.block = bytearray()     # a header block waiting for its CONTINUATION
        self.block_sid = 0           # its stream (0: none)
        self.block_flags = 0
        self.table = HpackTable(whole)
        self.synced = whole
        self.preface = 0         # preface bytes still to skip (client side, at the start)
        self.fresh = True        # no bytes seen yet
        self.max_frame = 16384 if whole else MAX_FRAME   # the peer's SETTINGS_MAX_FRAME_SIZE
        self.flen = 0            # the current frame's length
        self.last_ts = 0


class Http2Connection:
    """One HTTP/2 connection seen from one side. ``whole``: its first bytes were seen (a
    preface or the first SETTINGS), so both dynamic tables are known from empty; None: decided
    by the first bytes fed (anything else is a connection found mid-way, counted as
    ``h2_midway``)."""

    __slots__ = ("unparsed", "max_header_bytes", "exchanges", "streams", "dirs", "upgraded", "current",
                 "skipped", "server", "whole", "tries")

    def __init__(self, unparsed: Unparsed, max_header_bytes: int = 16384, whole: bool | None = None):
        self.unparsed = unparsed
        self.max_header_bytes = max_header_bytes
        self.exchanges: list[Exchange] = []
        self.streams: dict[int, Http2Exchange] = {}   # open streams with a request seen
        self.skipped: set[int] = set()                # open streams not reported (counted once)
        self.dirs = (_Direction(whole is not False), _Direction(whole is not False))   # [0] incoming, [1] outgoing
        self.whole = whole
        self.tries = 0           # calls fed while no direction was ever in sync (mid-way)
        self.upgraded = False    # never: the parser seam's flag for a protocol switch
        self.current = None      # the seam's "response being read": HTTP/2 has none apart from streams
        self.server: bool | None = None

    @property
    def pending(self) -> ValuesView[Http2Exchange]:
        """The exchanges in flight, oldest first (a live view, as the HTTP/1 parser's queue)."""
        return self.streams.values()

    # ------------------------------------------------------------------ bytes in

    def feed(self, outgoing: bool, data: bytes, size: int, ts: int) -> None:
        if self.whole is None:
            self.whole = looks_like_http2(data)
            if not self.whole:
                self.unparsed.add("h2_midway")
                for x in self.dirs:
                    x.fresh = False
                    x.max_frame = MAX_FRAME
                    self._desync(x, None)
        d = self.dirs[outgoing]
        d.last_ts = ts
        pos, n = 0, len(data)
        if d.fresh:   # a direction's first bytes: the client's preface?
            d.fresh = False
            if n and data[:24] == PREFACE[:min(n, 24)]:
                d.preface, d.synced = 24, True
                if self.server is None:
                    self.server = not outgoing
        if d.preface:
            pos = min(d.preface, n)
            d.preface -= pos
        elif not d.synced:
            if not self._plausible(data, size):
                if self.tries >= 0:
                    self.tries += 1
                    if self.tries >= MIDWAY_TRIES:
                        self.upgraded = True   # not HTTP/2 after all: the source stops watching it
                return
            d.synced = True
            self.tries = -1
        kept = self.max_header_bytes
        while pos < n:
            if d.ftype < 0 and not d.hdr and pos + 9 <= n:
                # the usual case: a whole frame in this call, its payload handed on as a slice
                length = int.from_bytes(data[pos:pos + 3], "big")
                end = pos + 9 + length
                if end <= n and length <= kept:
                    ftype = data[pos + 3]
                    if not d.block_sid and length <= d.max_frame:
                        if ftype == _WINDOW or ftype == _PING:
                            pos = end   # flow control and pings say nothing about requests
                            continue
                        flags = data[pos + 4]
                        if ftype == _HEADERS and flags & 0x2C == _END_HEADERS:   # a whole header block
                            sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                            block, pos = data[pos + 9:end], end
                            self._decode(d, outgoing, sid, flags, block, ts)
                            continue
                        if ftype == _DATA:
                            sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                            ex = self.streams.get(sid)
                            if ex is None or ex.grpc is not None:   # (else its prefix may say gRPC)
                                pos = end
                                if flags & _END_STREAM:
                                    self._end_stream(outgoing, sid, ts)
                                continue
                    if not self._frame_start(d, data[pos:pos + 9]):
                        self._desync(d, "h2_bad_frame")
                        return
                    d.left = 0
                    start, pos = pos + 9, end
                    self._frame_end(d, outgoing, ts, data[start:start + 5] if d.ftype == _DATA else data[start:end])
                    continue
            if d.ftype < 0:
                need = 9 - len(d.hdr)
                chunk = data[pos:pos + need]
                pos += len(chunk)
                if len(chunk) < need:
                    d.hdr += chunk
                    break
                h = bytes(d.hdr + chunk) if d.hdr else chunk
                d.hdr.clear()
                if not self._frame_start(d, h):
                    self._desync(d, "h2_bad_frame")
                    return
                if d.left == 0:
                    self._frame_end(d, outgoing, ts, d.payload)
                continue
            take = min(d.left, n - pos)
            ft = d.ftype
            if ft == _HEADERS or ft == _CONTINUATION or ft == _RST or ft == _SETTINGS:
                if len(d.payload) + take <= self.max_header_bytes:
                    d.payload += data[pos:pos + take]
                else:   # kept bounded: a header block this large is not decoded
                    d.cut = True
            elif ft == _DATA and len(d.payload) < 5:   # a gRPC message's prefix
                d.payload += data[pos:pos + min(take, 5 - len(d.payload))]
            pos += take
            d.left -= take
            if d.left == 0:
                self._frame_end(d, outgoing, ts, d.payload)
        missing = size - n
        if missing > 0:
            if d.ftype >= 0 and missing <= d.left:   # within the current frame's payload
                d.left -= missing
                d.cut = True
                if d.left == 0:
                    self._frame_end(d, outgoing, ts, d.payload)
            else:                                    # a frame header was not captured
                self._desync(d, "truncated")

    def _plausible(self, data: bytes, size: int) -> bool:
        """Whether ``data`` starts with a chain of frame headers that ends exactly at the end of
        the call (or beyond the capture): where a direction picks up after losing its framing."""
        pos, n = 0, len(data)
        while pos + 9 <= n:
            length = int.from_bytes(data[pos:pos + 3], "big")
            ftype = data[pos + 3]
            if ftype > _CONTINUATION or length > 16384 or data[pos + 5] & 0x80:
                return False
            pos += 9 + length
        return pos == n or (pos > n and size > n) or (pos < n and size > n and n - pos < 9)

    def _frame_start(self, d: _Direction, h: bytes) -> bool:
        length = int.from_bytes(h[:3], "big")
        ftype, flags = h[3], h[4]
        if length > d.max_frame:
            return False
        sid = int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
        if d.block_sid and (ftype != _CONTINUATION or sid != d.block_sid):
            return False   # a header block is interrupted: not HTTP/2, or not in sync
        if ftype == _CONTINUATION and not d.block_sid:
            return False
        d.ftype, d.fflags, d.sid, d.left, d.cut, d.flen = ftype, flags, sid, length, False, length
        if d.payload:
            d.payload.clear()
        return True

    def _frame_end(self, d: _Direction, outgoing: bool, ts: int, payload: bytes | bytearray) -> None:
        """A frame ends; ``payload``: what was kept of it (all of it for HEADERS, CONTINUATION,
        RST_STREAM and SETTINGS unless ``cut``; at least the first 5 bytes of DATA)."""
        ftype, flags, sid = d.ftype, d.fflags, d.sid
        d.ftype = -1
        if ftype == _DATA:
            ex = self.streams.get(sid)
            if ex is not None and ex.grpc is None and outgoing != ex.server and not flags & _PADDED:
                p = payload[:5]   # a length-prefixed message filling the frame: gRPC
                if len(p) == 5 and p[0] <= 1 and int.from_bytes(p[1:5], "big") == d.flen - 5:
                    ex.grpc = True
            if flags & _END_STREAM:
                self._end_stream(outgoing, sid, ts)
        elif ftype == _HEADERS:
            frag = bytes(payload)
            pad = 0
            if flags & _PADDED and frag:
                pad, frag = frag[0], frag[1:]
            if flags & _PRIO:
                frag = frag[5:]
            if pad and not d.cut:
                frag = frag[:-pad] if pad <= len(frag) else b""
            d.block_sid, d.block_flags = sid, flags
            d.block[:] = frag
            if d.cut:
                d.block_flags |= 0x100   # cut: undecodable
            if flags & _END_HEADERS:
                self._block_end(d, outgoing, ts)
        elif ftype == _CONTINUATION:
            d.block += payload
            if d.cut:
                d.block_flags |= 0x100
            if len(d.block) > self.max_header_bytes:
                d.block_flags |= 0x100
                d.block.clear()
            if flags & _END_HEADERS:
                self._block_end(d, outgoing, ts)
        elif ftype == _SETTINGS and not flags & 1 and not d.cut:
            p = payload
            for i in range(0, len(p) - 5, 6):   # SETTINGS_MAX_FRAME_SIZE (5) bounds the other direction
                if p[i] == 0 and p[i + 1] == 5:
                    self.dirs[not outgoing].max_frame = min(int.from_bytes(p[i + 2:i + 6], "big"), MAX_FRAME)
        elif ftype == _RST and sid:
            ex = self.streams.pop(sid, None)
            self.skipped.discard(sid)
            if ex is not None:
                self.unparsed.add("h2_reset")
                ex.error = "stream reset"
                ex.end_ns = max(ts, ex.start_ns)
                self.exchanges.append(ex)

    def _block_end(self, d: _Direction, outgoing: bool, ts: int) -> None:
        sid, flags, block = d.block_sid, d.block_flags, bytes(d.block)
        d.block_sid = 0
        d.block.clear()
        if flags & 0x100:
            self.unparsed.add("h2_headers_cut")
            d.table.forget()
            self._skip(sid)
            if flags & _END_STREAM:
                self._end_stream(outgoing, sid, ts)
            return
        self._decode(d, outgoing, sid, flags, block, ts)

    def _decode(self, d: _Direction, outgoing: bool, sid: int, flags: int, block: bytes, ts: int) -> None:
        """A whole header block of stream ``sid``."""
        try:
            h = decode_block(d.table, block)
        except (ValueError, IndexError):
            self.unparsed.add("h2_bad_hpack")
            d.table.forget()
            self._skip(sid)
            return
        self._headers(outgoing, sid, h, ts)
        if flags & _END_STREAM:
            self._end_stream(outgoing, sid, ts)

    def _skip(self, sid: int) -> None:
        if self.streams.pop(sid, None) is not None or sid not in self.skipped:
            if len(self.skipped) < MAX_STREAMS:
                self.skipped.add(sid)

    def _headers(self, outgoing: bool, sid: int, h: dict[bytes, object], ts: int) -> None:
        if sid in self.skipped:
            return
        ex = self.streams.get(sid)
        if ex is None:   # a request (or the response to a request not seen)
            method, path = h.get(b":method"), h.get(b":path")
            if method is None and path is None:
                if b":status" not in h and b"?" in h:
                    self.unparsed.add("h2_unknown_index")
                    self._skip(sid)
                else:
                    self.unparsed.add("unmatched_response")
                    self._skip(sid)   # its trailers are not counted again
                return
            if method is _UNKNOWN or path is _UNKNOWN or method is None or path is None:
                self.unparsed.add("h2_unknown_index")
                self._skip(sid)
                return
            if len(self.streams) >= MAX_STREAMS:
                self.unparsed.add("h2_stream_overflow")
                self._skip(sid)
                return
            assert isinstance(method, bytes) and isinstance(path, bytes)
            q = path.find(b"?")
            ctype, tp = h.get(b"content-type"), h.get(b"traceparent")
            # gRPC by its content-type; unknown while that may be an unknown entry (the response's
            # content-type or grpc-status then decides)
            grpc = ctype.startswith(b"application/grpc") if isinstance(ctype, bytes) else (
                None if b"?" in h else False)
            if self.server is None:
                self.server = not outgoing
            self.streams[sid] = Http2Exchange(
                not outgoing, ts, method.decode("ascii", "replace"),
                (path[:q] if q >= 0 else path).decode("utf-8", "replace"),
                tp.decode("ascii", "replace") if isinstance(tp, bytes) else None, grpc, sid)
            return
        if outgoing != ex.server:   # more request headers (trailers of the request)
            return
        status = h.get(b":status")
        if status is _UNKNOWN:
            self.unparsed.add("h2_unknown_index")
            del self.streams[sid]
            self._skip(sid)
            return
        if isinstance(status, bytes):
            try:
                code = int(status)
            except ValueError:
                code = 0
            if code >= 200:   # 1xx are informational
                ex.status = code
        if b"?" in h:
            ex.unknown = True
        ctype = h.get(b"content-type")
        if ex.grpc is None and isinstance(ctype, bytes):
            ex.grpc = ctype.startswith(b"application/grpc")
        gs = h.get(b"grpc-status")
        if ex.grpc is None and isinstance(gs, bytes):
            ex.grpc = True
        if isinstance(gs, bytes):
            try:
                ex.grpc_status = int(gs)
            except ValueError:
                pass

    def _end_stream(self, outgoing: bool, sid: int, ts: int) -> None:
        ex = self.streams.get(sid)
        if ex is None:
            if sid in self.skipped and outgoing == (self.server is True):
                self.skipped.discard(sid)   # the response of a skipped stream is over
            return
        if outgoing == ex.server:   # the response is complete
            del self.streams[sid]
            ex.end_ns = max(ts, ex.start_ns)
            if ex.grpc is None and not ex.unknown:
                ex.grpc = False   # a gRPC response carries its content-type and grpc-status: not gRPC
            if ex.status and ex.grpc is not None:
                self.exchanges.append(ex)
                if ex.grpc and ex.grpc_status is None and ex.unknown:
                    self.unparsed.add("h2_unknown_index")   # its status may be an unknown entry: left unset
            else:
                self.unparsed.add("h2_unknown_index")

    def _desync(self, d: _Direction, reason: str | None) -> None:
        if reason is not None:
            self.unparsed.add(reason)
        d.synced = False
        d.preface = 0
        d.ftype = -1
        d.hdr.clear()
        d.payload.clear()
        if d.block_sid:
            self._skip(d.block_sid)
        d.block_sid = 0
        d.block.clear()
        d.table.forget()

    def gap(self) -> None:
        """Records of this connection were lost in the kernel: both directions resynchronise,
        with unknown tables; the streams in flight are dropped."""
        self.unparsed.add("lost_data")
        for d in self.dirs:
            d.fresh = False
            self._desync(d, None)
        for sid in list(self.streams)[:MAX_STREAMS - len(self.skipped)]:
            self.skipped.add(sid)
        self.streams.clear()

    def close(self, ts: int) -> None:
        for ex in self.streams.values():
            self.unparsed.add("closed_mid_message")
            ex.error = "connection closed"
            ex.end_ns = max(ts, ex.start_ns)
            self.exchanges.append(ex)
        self.streams.clear()
        self.skipped.clear()


class _Upgraded(Protocol):
    """What an HTTP/1 connection hands over after ``101`` with ``Upgrade: h2c`` (http1.py)."""

    unparsed: Unparsed
    max_header_bytes: int
    server: bool | None
    h2c: Exchange | None
    h2c_rest: tuple[bytes, int] | None


def after_h2c_upgrade(h1: _Upgraded, ts: int) -> Http2Connection:
    """The HTTP/2 connection that continues an HTTP/1.1 one upgraded to h2c (RFC 7540 3.2): the
    upgraded request is stream 1, half-closed by the client, whose response comes in HTTP/2;
    both directions then start fresh (the client's preface, the server's SETTINGS), with empty
    tables. The bytes of the 101's call after its head (``h2c_rest``) are fed as the server's."""
    c = Http2Connection(h1.unparsed, h1.max_header_bytes, True)
    c.server = h1.server
    req = h1.h2c
    if req is None or not req.method:   # a request whose head could not be read: not reported
        c.skipped.add(1)
    else:
        ex = Http2Exchange(req.server, req.start_ns, req.method, req.path, req.traceparent, False, 1)
        ex.tid, ex.trace_id, ex.span_id, ex.parent_id = req.tid, req.trace_id, req.span_id, req.parent_id
        c.streams[1] = ex
    if h1.h2c_rest is not None and h1.server is not None:
        data, size = h1.h2c_rest
        c.feed(h1.server, data, size, ts)   # the server sent them
    return c
