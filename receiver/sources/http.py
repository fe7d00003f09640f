"""HTTP request source (``bpf/http.bpf.c``): HTTP/1.x over plaintext TCP as one span per
request and RED histograms.

The kernel copies the first ``capture_bytes`` of each read/write-family call on a TCP socket
that carries HTTP/1 (see the program's comment for how a TCP socket is told without kernel
structs) and says when the socket closes. Here each connection (socket address + the program's
connection id) gets a protocol parser (``receiver.protocols``) that frames and pairs requests
and responses; each completed exchange becomes an ``HttpRequest`` record and one observation of
``http.server.request.duration`` or ``http.client.request.duration``.

Endpoints come with the record for connections the program saw being made; for sockets opened
before it was attached, once per connection from ``/proc/PID/fd`` and ``/proc/PID/net/tcp{,6}``.
When a port filter is set and such a connection's server port is not in it, the program is told
to ignore that socket.

TLS: the same records carry the plaintext that uprobes on OpenSSL 3's ``SSL_read``/``SSL_write``
see (``http_tls.py`` attaches them to every libssl the host's processes map), marked so that
the connection's spans get ``url.scheme`` https. A TLS connection whose plaintext no uprobe saw
(Go's crypto/tls, a statically linked TLS library) is counted as ``tls_unparsed`` when it closes.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import mmap
import os
import random
import socket
import struct
import time
from collections import OrderedDict
from typing import Any

from ..config import EbpfConfig
from ..convert.durations import DurationHistograms
from ..convert.http import DURATION_BOUNDARIES, error_type, normal_method, parse_traceparent
from ..convert.rpc import RpcMetrics, split_path
from ..errors import SourceUnavailableError
from ..kernel.bcc import check_mirror, header_defines, header_enum
from ..kernel.filters import fill_process_filter
from ..kernel.loader import compile_bpf
from ..profiling import links
from ..protocols import UNPARSED_REASONS, Exchange, Http1Connection, Http2Connection, Unparsed, detect
from ..protocols.http2 import Http2Exchange, after_h2c_upgrade
from ..records import HttpRequest, HttpSeriesKey, HttpSnapshot, RpcCall, RpcSnapshot
from .base import BccSource, Requirement
from .http_tls import RETURN_PROGRAM, TLS_FUNCTIONS, TlsAttacher, probe_uprobe, uprobe_pmu

__all__ = ["HttpSource", "HttpEvent", "HttpSock", "DURATION_BOUNDARIES"]

log = logging.getLogger(__name__)

_D = header_defines("http.h")
EV_SEND, EV_RECV, EV_CLOSE = _D["HTTP_EV_SEND"], _D["HTTP_EV_RECV"], _D["HTTP_EV_CLOSE"]
F_GAP, F_ENDPOINTS, F_TLS, F_TLS_UNPARSED = (_D["HTTP_F_GAP"], _D["HTTP_F_ENDPOINTS"], _D["HTTP_F_TLS"],
                                         _D["HTTP_F_TLS_UNPARSED"])
S_IGNORED = _D["HTTP_S_IGNORED"]
COMM_LEN = _D["HTTP_COMM_LEN"]
IDLE_NS = 60_000_000_000   # a connection with nothing in flight, idle this long, is forgotten
# ... and one with requests in flight (its close record may have been lost), counted as lost_data
STUCK_NS = 900_000_000_000
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_U64 = 2**64 - 1
DRAIN_S = 0.1   # the longest a record waits in the ring buffer for a wake-up
_rand = random.Random()


class HttpEvent(ctypes.Structure):
    """Mirror of ``struct http_event`` in ``bpf/http.h``; the captured bytes follow it."""

    _fields_ = [("ts_ns", ctypes.c_uint64), ("sk", ctypes.c_uint64), ("conn_id", ctypes.c_uint64),
                ("cgroup_id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("fd", ctypes.c_uint32), ("size", ctypes.c_uint32), ("len", ctypes.c_uint16),
                ("local_port", ctypes.c_uint16), ("peer_port", ctypes.c_uint16), ("kind", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("direction", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 7),
                ("local_addr", ctypes.c_uint8 * 16), ("peer_addr", ctypes.c_uint8 * 16),
                ("comm", ctypes.c_char * COMM_LEN), ("link_span", ctypes.c_uint64)]


class HttpSock(ctypes.Structure):
    """Mirror of ``struct http_sock``."""

    _fields_ = [("conn_id", ctypes.c_uint64), ("local_port", ctypes.c_uint16), ("peer_port", ctypes.c_uint16),
                ("direction", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("seen", ctypes.c_uint8),
                ("pad", ctypes.c_uint8),
                ("local_addr", ctypes.c_uint8 * 16), ("peer_addr", ctypes.c_uint8 * 16)]


_HDR = ctypes.sizeof(HttpEvent)
# ts_ns, sk, conn_id, cgroup_id, pid, tid, fd, size, len, local_port, peer_port, kind, flags
_FIXED = struct.Struct("<QQQQIIIIHHHBB")
_LINK = struct.Struct("<Q")
_LINK_OFF = HttpEvent.link_span.offset
assert _FIXED.size == HttpEvent.flags.offset + 1


class RingReader:
    """A BPF ring buffer read through its mapped memory in one Python loop: per record a slice
    and a call, instead of libbpf's callback through ctypes (a C-to-Python transition, two more
    Python frames and a copy per record). The layout is the kernel's (kernel/bpf/ringbuf.c): the
    consumer position's page (writable), then the producer position's page and the data pages,
    mapped twice in a row so that a record that wraps reads as one slice; each record starts
    with a u32 length (BUSY: not committed yet, DISCARD: skipped) and a u32 page offset, and
    takes its length rounded up to 8 after that 8-byte header."""

    BUSY, DISCARD = 1 << 31, 1 << 30
    STORE_EVERY = 64   # records between two stores of the consumer position (space for the kernel)

    def __init__(self, cons: Any, data: Any, size: int, page: int = mmap.PAGESIZE):
        """``cons``: the consumer position's page; ``data``: the producer position's page and
        the data mapped twice (``page + 2 * size`` bytes); see ``open``."""
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        self._cons, self._data = cons, data
        self._page, self._mask = page, size - 1

    @classmethod
    def open(cls, map_fd: int, size: int) -> "RingReader":
        """The reader of the ring buffer map ``map_fd`` of ``size`` data bytes, mapped."""
        page = mmap.PAGESIZE
        cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            data = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            cons.close()
            raise
        return cls(cons, data, size, page)

    def read(self, handle: Any) -> int:
        """Hands every committed record (bytes) to ``handle``; returns how many were read."""
        data, cons_map = self._data, self._cons
        q, u32 = _U64S, _U32S
        page, mask, busy, discard = self._page, self._mask, self.BUSY, self.DISCARD
        cons = q.unpack_from(cons_map, 0)[0]
        prod = q.unpack_from(data, 0)[0]
        n = 0
        while cons < prod:
            off = page + (cons & mask)
            hdr = u32.unpack_from(data, off)[0]
            if hdr & busy:
                break
            length = hdr & ~(busy | discard)
            if not hdr & discard:
                handle(data[off + 8:off + 8 + length])
            cons += (length + 15) & ~7
            n += 1
            if n % self.STORE_EVERY == 0:
                q.pack_into(cons_map, 0, cons)
            if cons >= prod:
                prod = q.unpack_from(data, 0)[0]
        q.pack_into(cons_map, 0, cons)
        return n

    def close(self) -> None:
        self._cons.close()
        self._data.close()


_U64S, _U32S = struct.Struct("<Q"), struct.Struct("<I")


def _address(raw: bytes) -> str:
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _proc_address(hexaddr: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or 32 hex digits for IPv6) as /proc/net/tcp{,6} write it."""
    a, _, p = hexaddr.partition(":")
    raw = bytes.fromhex(a)
    # each 32-bit word is in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw), int(p, 16)
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:]), int(p, 16)
    return socket.inet_ntop(socket.AF_INET6, raw), int(p, 16)


def socket_endpoints(pid: int, fd: int) -> tuple[str, int, str, int] | None:
    """(local address, local port, peer address, peer port) of a process's TCP socket, from
    /proc; None when the descriptor is gone or not a TCP socket."""
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not link.startswith("socket:["):
        return None
    inode = link[8:-1]
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] == inode:
                        local, peer = _proc_address(parts[1]), _proc_address(parts[2])
                        return local[0], local[1], peer[0], peer[1]
        except OSError:
            continue
    return None


class _Conn:
    """One connection as seen from one process."""

    __slots__ = ("parser", "pid", "comm", "cgroup_id", "local", "peer", "ignored", "last_ns", "scheme")

    def __init__(self, parser: Http1Connection | Http2Connection | None, pid: int, comm: str, cgroup_id: int,
                 local: tuple[str, int], peer: tuple[str, int]):
        self.parser = parser
        self.pid, self.comm, self.cgroup_id = pid, comm, cgroup_id
        self.local, self.peer = local, peer
        self.ignored = parser is None
        self.last_ns = 0
        self.scheme = "http"


def _overflow_key(key: HttpSeriesKey) -> HttpSeriesKey:
    return key[0], "", 0, "", 0, "", "", ""


class HttpMetrics(DurationHistograms):
    """Cumulative duration histograms per process and attribute set, at most
    ``max_attribute_sets`` of them; beyond, one overflow series per side (under pid 0)."""

    def __init__(self, max_attribute_sets: int):
        super().__init__(max_attribute_sets, _overflow_key)


class HttpSource(BccSource):
    name = "http"
    bpf_file = "http.bpf.c"
    lost_reasons = header_enum("http.h", "HTTP_LOST")
    ring_buffers = ()   # "events" is read by RingReader (start)
    mirrors = (("mirror_http_event", "Leaf", HttpEvent), ("socks", "Leaf", HttpSock))
    min_record_size = _HDR

    CALLS = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg")
    TRACEPOINTS = ("sock:inet_sock_set_state", "sock:sock_send_length", "sock:sock_recv_length",
                   *(f"syscalls:sys_{edge}_{call}" for call in CALLS for edge in ("enter", "exit")))

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.config = ctx.config.sources.http
        self.report_interval = float(self.config.report_interval)
        self._ports = frozenset(self.config.ports)
        self._spans_on = bool(self.config.spans)
        self._metrics_on = bool(self.config.metrics)
        prof = self._prof_config = ctx.config.sources.profiler
        # docs/profiler.md#request-links: our profiler's links, OBI's traces_ctx_v1 written
        self._ctx_write = bool(self.config.traces_ctx_write)
        self._links = bool(prof.enabled and prof.request_links) or self._ctx_write
        if self._ctx_write and not (prof.enabled and prof.request_links):   # else the profiler shows them
            ctx.telemetry.watch_counters(
                "profiler_request_links", "Request links: server spans written to OBI's traces_ctx_v1 "
                "(sources.http.traces_ctx_write): written, write_late (answered before user space read the "
                "request), write_failed", "reason", lambda: dict(links.counts))
        self.unparsed = Unparsed((*UNPARSED_REASONS, "tls_unparsed"))
        self.tls: TlsAttacher | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.tls_unavailable = ""   # why there are no TLS uprobes
        self._conns: OrderedDict[tuple[int, int], _Conn] = OrderedDict()
        # thread id → server requests it read and has not answered yet (bounded by max_connections)
        self._serving: OrderedDict[int, list[Exchange]] = OrderedDict()
        self._evictions = 0
        self._metrics = HttpMetrics(self.config.max_attribute_sets)
        self._rpc_metrics = RpcMetrics(self.config.max_attribute_sets)
        self._start_unix_ns = time.time_ns()
        self._n_received = 0
        self._ring: RingReader | None = None   # the events ring buffer, read here (not through libbpf)
        self._hand_on = ctx.consumer.consume_event
        self._to_unix = ctx.clock.to_unix_nano
        counts = self.unparsed.counts
        ctx.telemetry.watch_counters(
            "http_unparsed", "HTTP bytes the request source could not parse, or requests it could "
            "not pair, by reason (see docs/operations.md)", "reason", lambda: dict(counts))
        ctx.telemetry.watch_cache("http_connections", lambda: len(self._conns), self.config.max_connections,
                                  lambda: self._evictions)
        metrics = self._metrics
        ctx.telemetry.watch_cache("http_series", lambda: len(metrics.series), self.config.max_attribute_sets + 2)

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        # uprobes for TLS plaintext: optional (``check`` reports it; the source runs without)
        return [*(Requirement("tracepoint", tp) for tp in cls.TRACEPOINTS), Requirement("pmu", "uprobe")]

    def cflags(self) -> list[str]:
        from ..kernel.host import tracefs_root

        root = tracefs_root()
        if root is not None and not (root / "events" / "sock" / "sock_send_length").is_dir():
            raise SourceUnavailableError(self.name, "kernel without the sock:sock_send_length and "
                                         "sock_recv_length tracepoints (added in 6.3): they tell a call on a "
                                         "TCP socket from one on a file (the agent uses no kprobes)",
                                         "a kernel >= 6.3")
        c = self.config
        cap_max = 1 << (int(c.capture_bytes) - 1).bit_length()
        return [f"-DCAPTURE_BYTES={int(c.capture_bytes)}", f"-DCAPTURE_MAX={cap_max}",
                f"-DMAX_SOCKETS={int(c.max_connections)}", f"-DMAX_CALLS={int(c.max_calls)}",
                f"-DRINGBUF_PAGES={int(c.ring_buffer_pages)}",
                f"-DFILTER_PORTS={1 if c.ports else 0}", f"-DFILTER_PROCESS={1 if c.filter.active else 0}",
                *self._link_cflags()]

    def _link_cflags(self) -> list[str]:
        if not self._links:
            return []
        try:
            return links.cflags(float(self._prof_config.request_links_probability), write=self._ctx_write)
        except OSError as e:
            log.warning("source http: no request links for the profiler: %s", e)
            self._links = False
            return []

    def _compile(self) -> Any:
        programs = [(name, "KPROBE", None) for name in (*TLS_FUNCTIONS.values(), RETURN_PROGRAM)]
        cflags = self.cflags()
        bpf = compile_bpf(self.name, self.bpf_file, cflags, programs,   # links: pinned maps
                          pins=links.pins() if self._links else None)
        try:
            for map_name, part, mirror in self.mirrors:
                check_mirror(bpf, map_name, part, mirror, self.name)
        except BaseException:
            bpf.cleanup()
            raise
        return bpf

    def configure(self, bpf: Any) -> None:
        bpf["self_tgid"][ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())   # the agent's own connections
        pmu = uprobe_pmu()
        can, why = probe_uprobe()
        if isinstance(pmu, str) or not can:
            self.tls_unavailable = why
            log.warning("source http: no TLS plaintext: %s", why)
        else:
            self.tls = TlsAttacher(dict(bpf.programs), pmu)
            self.tls.scan()
            if not self.config.keep_sys_admin_for_tls:
                log.warning("source http: TLS uprobes on the %d libssl files mapped now cover every process "
                            "that maps them, now and later; a libssl first mapped after start (a new "
                            "container's own) is not probed: CAP_SYS_ADMIN, which creating a uprobe needs, is "
                            "dropped after start (sources.http.keep_sys_admin_for_tls: true keeps it)",
                            len(self.tls.libraries))
        one = ctypes.c_uint8(1)
        for port in self.config.ports:
            bpf["filter_ports"][ctypes.c_uint16(port)] = one
        fill_process_filter(bpf, self.config.filter, self.name)
        self._start_unix_ns = time.time_ns()

    # ------------------------------------------------------------------ records

    def handle_event(self, data: int, size: int) -> None:
        if size < _HDR:
            self.count_lost("decode_error")
            return
        self.handle_record(ctypes.string_at(data, size))

    def _record(self, raw: bytes) -> None:
        """One record from the ring buffer (RingReader): a bad one is counted, never raised."""
        try:
            if len(raw) < _HDR:
                self.count_lost("decode_error")
                return
            self.handle_record(raw)
        except Exception:
            log.exception("source http: cannot decode a record")
            self.count_lost("decode_error")

    def handle_record(self, raw: bytes) -> None:
        # One unpack of the fields every record needs: the rest of the header (owner,
        # endpoints) is read only for a connection's first record.
        size = len(raw)
        ts, sk, conn_id, _cg, _pid, tid, _fd, moved, length, _lp, _pp, kind, flags = _FIXED.unpack_from(raw)
        key = (sk, conn_id)
        self._n_received += 1   # added to the self-metric once per ring-buffer read (_consume)
        if kind == EV_CLOSE:
            if flags & F_TLS_UNPARSED:
                self.unparsed.add("tls_unparsed")
            conn = self._conns.pop(key, None)
            if conn is not None and conn.parser is not None:
                conn.parser.close(ts)
                self._emit(conn)
            return
        if (kind != EV_SEND and kind != EV_RECV) or _HDR + length > size or length > moved:
            self._n_received -= 1
            self.count_lost("decode_error")
            return
        payload = raw[_HDR:_HDR + length]
        conn = self._conns.get(key)
        if conn is None:
            conn = self._new_conn(HttpEvent.from_buffer_copy(raw, 0), payload)
        else:
            self._conns.move_to_end(key)
        parser = conn.parser
        if parser is None:
            return
        if type(parser) is Http1Connection and parser.server is None and detect(payload) == "http2":
            # HTTP/2 after bytes that said nothing (a TLS handshake before the uprobes' plaintext)
            parser = conn.parser = Http2Connection(self.unparsed, self.config.max_header_bytes)
        if flags & F_GAP:
            parser.gap()
        pending = parser.pending
        n = len(pending)
        parser.feed(kind == EV_SEND, payload, moved, ts)
        if len(pending) > n and type(parser) is Http1Connection:
            link = _LINK.unpack_from(raw, _LINK_OFF)[0] if self._links else 0
            self._requests_started(parser, tid, pending, n, link, conn.pid)
        conn.last_ns = ts
        if parser.exchanges:
            self._emit(conn)
        if parser.upgraded:   # no longer HTTP/1: the kernel stops sending it (h2c: HTTP/2 goes on)
            if type(parser) is Http1Connection and parser.h2c is not None:
                self._h2c(conn, parser, ts)
            else:
                self._ignore(sk, conn)

    def _h2c(self, conn: _Conn, h1: Http1Connection, ts: int) -> None:
        """An HTTP/1.1 connection upgraded to h2c: the HTTP/2 parser takes over, its stream 1
        the upgraded request (which keeps its place among the requests its thread serves)."""
        old = h1.h2c
        h2 = conn.parser = after_h2c_upgrade(h1, ts)
        new = h2.streams.get(1)
        serving = self._serving.get(old.tid) if old is not None and old.tid else None
        if serving is not None and old in serving:
            if new is not None:
                serving[serving.index(old)] = new
            else:   # answered in the 101's own call
                serving.remove(old)
                if not serving:
                    del self._serving[old.tid]
        if h2.exchanges:
            self._emit(conn)

    def _new_conn(self, ev: HttpEvent, payload: bytes) -> _Conn:
        if ev.flags & F_ENDPOINTS:
            local = (_address(bytes(ev.local_addr)), ev.local_port)
            peer = (_address(bytes(ev.peer_addr)), ev.peer_port)
        else:   # opened before the program was attached
            found = socket_endpoints(ev.pid, ev.fd)
            local, peer = ((found[0], found[1]), (found[2], found[3])) if found else (("", 0), ("", 0))
        ignored = False
        if self._ports and not ev.flags & F_ENDPOINTS:
            # the first bytes say which side this is: a request received → the server
            receives_requests = (ev.kind == EV_RECV) != payload.startswith(b"HTTP/")
            server_port = local[1] if receives_requests else peer[1]
            ignored = server_port not in self._ports
        h2 = detect(payload) == "http2"   # the client's preface or a server's first SETTINGS
        parser = None if ignored else (Http2Connection if h2 else Http1Connection)(
            self.unparsed, self.config.max_header_bytes)
        conn = _Conn(parser, ev.pid, ev.comm.decode("utf-8", "replace"), ev.cgroup_id, local, peer)
        if ev.flags & F_TLS:
            conn.scheme = "https"
        self._conns[(ev.sk, ev.conn_id)] = conn
        if ignored:
            self._ignore(ev.sk, conn)
        if len(self._conns) > self.config.max_connections:
            self._conns.popitem(last=False)
            self._evictions += 1
        return conn

    def _requests_started(self, parser: Http1Connection, tid: int, pending: Any, n: int, link: int = 0,
                          pid: int = 0) -> None:
        """Request heads just parsed (``pending[n:]``) by thread ``tid``. A server's get their
        span ids now, and the thread is serving them until they are emitted; a client's made by a
        thread serving exactly one request become its children (thread-per-request servers; a
        thread with several requests in flight, an event loop, gives no parent rather than a
        guessed one), unless they carry their own traceparent."""
        new = list(itertools.islice(pending, n, None))
        if parser.server:
            # the span id the kernel chose for the thread's request (links on, one new request:
            # pipelined heads parsed from one record get their own random ids, unlinked)
            if self._links:
                if link and len(new) != 1:
                    links.count("pipelined")
                    link = 0
                else:
                    links.count("linked" if link else "not_linked")
            for ex in new:
                ex.tid = tid
                parent = parse_traceparent(ex.traceparent)
                bits = _rand.getrandbits(192)
                if parent is not None:
                    ex.trace_id, ex.parent_id = parent
                else:
                    ex.trace_id = (bits >> 64).to_bytes(16, "little")
                ex.span_id = (bits & _U64).to_bytes(8, "little")
                if link:
                    ex.span_id = link.to_bytes(8, "little")
                    links.register(link, ex.trace_id, pid, tid)
            serving = self._serving.get(tid)
            if serving is None:
                serving = self._serving[tid] = []
                if len(self._serving) > self.config.max_connections:
                    self._serving.popitem(last=False)
            serving.extend(new)
            return
        serving = self._serving.get(tid)
        if serving is None or len(serving) != 1:
            return
        srv = serving[0]
        for ex in new:
            if parse_traceparent(ex.traceparent) is None:
                ex.trace_id, ex.parent_id = srv.trace_id, srv.span_id

    def _ignore(self, sk: int, conn: _Conn) -> None:
        conn.ignored = True
        conn.parser = None
        if self.bpf is None:
            return
        socks = self.bpf["socks"]
        try:
            entry = socks[socks.Key(sk)]
            entry.flags |= S_IGNORED
            socks[socks.Key(sk)] = entry
        except KeyError:
            pass   # closed meanwhile

    def _emit(self, conn: _Conn) -> None:
        parser = conn.parser
        assert parser is not None
        exchanges, parser.exchanges = parser.exchanges, []
        to_unix = self._to_unix
        serving_of = self._serving
        for ex in exchanges:
            server = ex.server
            if ex.tid:
                serving = serving_of.get(ex.tid)
                if serving is not None:
                    if ex in serving:
                        serving.remove(ex)
                    if not serving:
                        del serving_of[ex.tid]
            srv, cli = (conn.local, conn.peer) if server else (conn.peer, conn.local)
            duration = ex.end_ns - ex.start_ns
            if isinstance(ex, Http2Exchange) and ex.grpc and self._rpc(conn, ex, srv, cli, duration):
                continue
            if self._spans_on:
                self._hand_on(HttpRequest(
                    conn.pid, conn.comm, conn.cgroup_id, to_unix(ex.start_ns), duration, server, ex.method,
                    ex.path, conn.scheme, ex.version, ex.status, srv[0], srv[1], cli[0], cli[1],
                    ex.traceparent, ex.error, ex.trace_id, ex.span_id, ex.parent_id))
            if self._metrics_on:
                key = (server, normal_method(ex.method), ex.status, srv[0], srv[1], ex.version, conn.scheme,
                       error_type(server, ex.status, ex.error))
                self._metrics.observe(conn.pid, conn.comm, key, duration / 1e9)

    def _rpc(self, conn: _Conn, ex: Http2Exchange, srv: tuple[str, int], cli: tuple[str, int],
             duration: int) -> bool:
        """A gRPC call's span and observation; False when its path is not a gRPC method's."""
        service, method = split_path(ex.path)
        if not service:
            return False
        if self._spans_on:
            self._hand_on(RpcCall(conn.pid, conn.comm, conn.cgroup_id, self._to_unix(ex.start_ns), duration,
                                  ex.server, service, method, ex.status, ex.grpc_status, srv[0], srv[1], cli[0],
                                  cli[1], ex.traceparent, ex.error))
        if self._metrics_on:
            status = -1 if ex.grpc_status is None else ex.grpc_status
            self._rpc_metrics.observe(conn.pid, conn.comm, (ex.server, service, method, status, srv[0], srv[1]),
                                      duration / 1e9)
        return True

    # ------------------------------------------------------------------ periodic

    async def start(self) -> None:
        await super().start()
        if self._ring is None and self.bpf is not None:
            try:
                fd = self.bpf["events"].map_fd
                self._ring = RingReader.open(fd, int(self.bpf["events"].max_entries))
                asyncio.get_running_loop().add_reader(fd, self._consume)
                self._reader_fds.append(fd)
            except Exception as e:
                await self.stop()
                raise SourceUnavailableError(self.name, f"ring buffer: {type(e).__name__}: {e}") from e
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="source-http-drain")

    async def stop(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            await asyncio.gather(self._drain_task, return_exceptions=True)
            self._drain_task = None
        await super().stop()

    async def _drain(self) -> None:
        """The kernel wakes the reader once per ``WAKE_EVERY`` records of a CPU (a wake-up per
        record costs more than the record): what arrives between wake-ups is read here."""
        while True:
            await asyncio.sleep(DRAIN_S)
            if self.bpf is not None:
                self._consume()

    def _consume(self) -> None:
        if self._ring is not None:
            try:
                self._ring.read(self._record)
            except Exception:
                log.exception("source http: ring buffer read failed")
        n, self._n_received = self._n_received, 0
        if n:
            self._received.inc(n)

    def detach(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.tls is not None:
            self.tls.close()
            self.tls = None

    def collect(self) -> None:
        if self.tls is not None and self.config.keep_sys_admin_for_tls:   # else no new uprobe can be made
            self.tls.scan()
        now = time.monotonic_ns()
        stale = []
        for key, conn in self._conns.items():   # oldest activity first
            idle = now - conn.last_ns
            if idle < IDLE_NS:
                break
            p = conn.parser
            if p is None or not (p.pending or p.current):
                stale.append(key)
            elif idle >= STUCK_NS:
                self.unparsed.add("lost_data")
                stale.append(key)
        for key in stale:
            del self._conns[key]
        old = now - IDLE_NS   # server requests that never completed (e.g. dropped by a resync)
        for tid in [t for t, exs in self._serving.items() if exs[0].start_ns < old]:
            exs = [ex for ex in self._serving[tid] if ex.start_ns >= old]
            if exs:
                self._serving[tid] = exs
            else:
                del self._serving[tid]
        if not self._metrics_on:
            return
        by_pid = self._metrics.by_pid()
        dead = {pid for pid in by_pid if pid and not os.path.exists(f"/proc/{pid}")}
        self.ctx.consumer.consume_metrics(HttpSnapshot(self._start_unix_ns, time.time_ns(), DURATION_BOUNDARIES,
                                                       by_pid, dead))
        if dead:
            self._metrics.forget_pids(dead)
        rpc = self._rpc_metrics.by_pid()
        if rpc:
            gone = {pid for pid in rpc if pid and not os.path.exists(f"/proc/{pid}")}
            self.ctx.consumer.consume_metrics(RpcSnapshot(self._start_unix_ns, time.time_ns(), DURATION_BOUNDARIES,
                                                          rpc, gone))
            if gone:
                self._rpc_metrics.forget_pids(gone)
