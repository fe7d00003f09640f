"""TCP network source (``bpf/network.bpf.c``): one span per finished connection and cumulative
connection metrics.

The kernel keeps one entry per connection and sends it to the ring buffer once, when it closes.
Every ``report_interval`` the still-open connections are read from the map (their counts so far
go into the metrics) and entries closed by an abort whose reset never came are finished here.
Filters are in kernel maps: ``ports`` selects by server port (the peer port of a client, the
local port of a server), ``addresses`` by peer address or network, ``filter`` by the owning
process. The agent's own connections (e.g. its export to the Collector) are never tracked, so
exporting cannot feed itself.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import time
from typing import Any

from ..aggregates import ConnectionMetrics, SeriesKey
from ..config import EbpfConfig
from ..kernel.bcc import header_enum
from ..kernel.filters import fill_process_filter
from ..records import ConnectionSnapshot, TcpConnection
from .base import BccSource, Requirement

__all__ = ["NetworkSource", "NetConn", "NetEvent"]

log = logging.getLogger(__name__)

NET_COMM_LEN = 16
NET_DIR_CLIENT = 1
NET_F_ESTABLISHED = 1
NET_F_CLOSED = 2
AF_INET = 2
# An entry closed by an abort (or before its owner was known) waits this long for its reset (or
# owner) before user space finishes it.
CLOSED_GRACE_NS = 1_000_000_000
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


class NetConn(ctypes.Structure):
    """Mirror of ``struct net_conn`` in ``bpf/network.h``."""

    _fields_ = [("start_ns", ctypes.c_uint64), ("end_ns", ctypes.c_uint64),
                ("bytes_sent", ctypes.c_uint64), ("bytes_received", ctypes.c_uint64),
                ("cgroup_id", ctypes.c_uint64), ("retransmits", ctypes.c_uint32),
                ("resets_sent", ctypes.c_uint32), ("resets_received", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("local_port", ctypes.c_uint16), ("peer_port", ctypes.c_uint16),
                ("family", ctypes.c_uint16), ("direction", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("local_addr", ctypes.c_uint8 * 16), ("peer_addr", ctypes.c_uint8 * 16),
                ("comm", ctypes.c_char * NET_COMM_LEN)]


class NetEvent(ctypes.Structure):
    """Mirror of ``struct net_event``."""

    _fields_ = [("sk", ctypes.c_uint64), ("c", NetConn)]


def _address(raw: bytes) -> tuple[str, str]:
    """(network.type, address) of an IPv6 or IPv4-mapped address as the kernel record has it."""
    if raw[:12] == _V4_MAPPED:
        return "ipv4", socket.inet_ntop(socket.AF_INET, raw[12:])
    return "ipv6", socket.inet_ntop(socket.AF_INET6, raw)


class NetworkSource(BccSource):
    name = "network"
    bpf_file = "network.bpf.c"
    lost_reasons = header_enum("network.h", "NET_LOST")
    mirrors = (("conns", "Leaf", NetConn), ("mirror_net_event", "Leaf", NetEvent))
    min_record_size = ctypes.sizeof(NetEvent)

    TRACEPOINTS = ("sock:inet_sock_set_state", "sock:sock_send_length", "sock:sock_recv_length",
                   "tcp:tcp_retransmit_skb", "tcp:tcp_send_reset", "tcp:tcp_receive_reset")

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.config = ctx.config.sources.network
        self.report_interval = float(self.config.report_interval)
        self._metrics_on = bool(self.config.metrics)
        self._metrics = ConnectionMetrics(self.config.max_attribute_sets, self.config.peer_attributes)
        self._start_unix_ns = time.time_ns()
        self._stopping = False
        self._hand_on = ctx.consumer.consume_event
        metrics = self._metrics   # beyond max_attribute_sets: the overflow series, not evictions
        ctx.telemetry.watch_cache("network_series", lambda: len(metrics.series),
                                  self.config.max_attribute_sets + 1)
        ctx.telemetry.watch_cache("network_open_connections", metrics.open_connections,
                                  self.config.max_connections)

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        return [Requirement("tracepoint", tp) for tp in cls.TRACEPOINTS]

    def cflags(self) -> list[str]:
        from ..kernel import features as kernel_features

        kernel_features.require(self.name)   # runs before the compile: a clear reason, not a BCC error
        c = self.config
        return [f"-DMAX_CONNECTIONS={int(c.max_connections)}", f"-DRINGBUF_PAGES={int(c.ring_buffer_pages)}",
                f"-DFILTER_PORTS={1 if c.ports else 0}", f"-DFILTER_ADDRESSES={1 if c.addresses else 0}",
                f"-DFILTER_PROCESS={1 if c.filter.active else 0}"]

    def configure(self, bpf: Any) -> None:
        bpf["self_tgid"][ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())   # the agent's own connections
        self._fill_endpoint_filters(bpf)
        fill_process_filter(bpf, self.config.filter, self.name)
        self._start_unix_ns = time.time_ns()

    def _fill_endpoint_filters(self, bpf: Any) -> None:
        """Server ports; peer networks as IPv6 (IPv4 as IPv4-mapped) LPM-trie prefixes."""
        one = ctypes.c_uint8(1)
        for port in self.config.ports:
            bpf["filter_ports"][ctypes.c_uint16(port)] = one
        addrs = bpf["filter_addrs"]
        for a in self.config.addresses:
            net = ipaddress.ip_network(a, strict=False)
            key = addrs.Key()
            if net.version == 4:
                raw, key.prefixlen = _V4_MAPPED + net.network_address.packed, net.prefixlen + 96
            else:
                raw, key.prefixlen = net.network_address.packed, net.prefixlen
            ctypes.memmove(ctypes.addressof(key.addr), raw, 16)
            addrs[key] = one

    # ------------------------------------------------------------------ kernel records → connections

    def _record(self, c: NetConn, end_ns: int, finished: bool) -> TcpConnection:
        net_type, local = _address(bytes(c.local_addr))
        return TcpConnection(
            pid=c.pid, comm=c.comm.decode("utf-8", "replace"), cgroup_id=c.cgroup_id,
            start_unix_nano=self.ctx.clock.to_unix_nano(c.start_ns), duration_ns=max(end_ns - c.start_ns, 0),
            finished=finished, client=c.direction == NET_DIR_CLIENT, network_type=net_type,
            local_address=local, local_port=c.local_port, peer_address=_address(bytes(c.peer_addr))[1],
            peer_port=c.peer_port, established=bool(c.flags & NET_F_ESTABLISHED),
            sent_bytes=c.bytes_sent, received_bytes=c.bytes_received, retransmits=c.retransmits,
            resets_sent=c.resets_sent, resets_received=c.resets_received)

    @staticmethod
    def _counts(c: NetConn) -> tuple[int, ...]:
        return (c.bytes_sent, c.bytes_received, c.retransmits, c.resets_sent, c.resets_received)

    def _series_key(self, r: TcpConnection) -> SeriesKey:
        return self._metrics.key(r.pid, "client" if r.client else "server", r.network_type,
                                 r.peer_address, r.peer_port)

    def _finished(self, sk: int, c: NetConn) -> None:
        rec = self._record(c, c.end_ns, finished=True)
        self._hand_on(rec)
        if self._metrics_on:
            self._metrics.observe_finished((sk, c.start_ns), self._series_key(rec), rec.comm, self._counts(c),
                                           rec.outcome, rec.duration_ns / 1e9)

    def handle_event(self, data: int, size: int) -> None:
        ev = NetEvent.from_address(data)
        self._received.inc()
        self._finished(ev.sk, ev.c)

    # ------------------------------------------------------------------ periodic: open connections

    def collect(self) -> None:
        conns = self.bpf["conns"]
        now_k = time.monotonic_ns()   # the clock bpf_ktime_get_ns() reads
        grace = 0 if self._stopping else CLOSED_GRACE_NS
        self._metrics.begin_scan()
        finished = []
        for sk, c in _items(conns):
            if c.flags & NET_F_CLOSED:
                if now_k - c.end_ns >= grace:
                    finished.append((sk, c))
                continue
            if not self._metrics_on:
                continue
            rec = self._record(c, now_k, finished=False)
            self._metrics.observe_active((sk, c.start_ns), self._series_key(rec), rec.comm, self._counts(c))
        self._metrics.end_scan()
        for sk, c in finished:   # the reset or owner never came (e.g. a timeout): finished now
            try:
                del conns[conns.Key(sk)]
            except KeyError:
                continue   # the kernel finished it meanwhile
            if c.pid or not self.config.filter.active:   # no owner: the process filter cannot select it
                self._received.inc()
                self._finished(sk, c)
        self._export_metrics()

    async def stop(self) -> None:
        self._stopping = True   # the last collection finishes every closed connection
        try:
            await super().stop()
        finally:
            self._stopping = False

    def _export_metrics(self) -> None:
        if not self._metrics_on:
            return
        by_pid = self._metrics.by_pid()
        dead = {pid for pid in by_pid if pid and not os.path.exists(f"/proc/{pid}")}
        self.ctx.consumer.consume_metrics(ConnectionSnapshot(self._start_unix_ns, time.time_ns(), by_pid, dead))
        if dead:   # their final values went out above
            self._metrics.forget_pids(dead)


def _items(table: Any) -> list[tuple[int, NetConn]]:
    """All entries as (socket address, connection), in one batched read where the kernel allows."""
    try:
        pairs = list(table.items_lookup_batch())
    except Exception:   # older kernels / BCC without batch ops
        pairs = list(table.items())
    return [(getattr(k, "value", k), NetConn.from_buffer_copy(v)) for k, v in pairs]
