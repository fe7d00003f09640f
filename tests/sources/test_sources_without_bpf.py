"""Sources driven without root, BPF or an exporter: ring-buffer records packed as the kernel
packs them go into ``handle_event``, and what the source hands on is read from a recording
consumer; the pipeline is driven the same way into a recording sink."""

from __future__ import annotations

import ctypes
import socket
from typing import Any

import pytest

from receiver.config import EbpfConfig
from receiver.convert.converter import EbpfOtlpConverter
from receiver.convert.network import connection_event
from receiver.errors import SourceUnavailableError
from receiver.kernel.bcc import check_mirror
from receiver.kernel.clock import KernelClock
from receiver.model import EbpfEventType, Signal
from receiver.pipeline import Pipeline, ProcessResources
from receiver.records import ConnectionSnapshot, ProcessRecord, SlowSyscall, TcpConnection
from receiver.sources.base import SourceContext
from receiver.sources.network import NET_DIR_CLIENT, NET_F_ESTABLISHED, NetEvent, NetworkSource
from receiver.sources.process import PROC_ARG_LEN, PROC_EVENT_EXEC, ExecEvent, ProcessSource
from receiver.sources.syscalls import ScSlowEvent, SyscallsSource
from receiver.telemetry import SelfTelemetry


class RecordingConsumer:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.snapshots: list[Any] = []
        self.profiles: list[Any] = []

    def consume_event(self, record: Any) -> None:
        self.events.append(record)

    def consume_metrics(self, snapshot: Any) -> None:
        self.snapshots.append(snapshot)

    def consume_profile(self, profile: Any) -> None:
        self.profiles.append(profile)


class RecordingSink:
    def __init__(self) -> None:
        self.items: list[tuple[Signal, Any, Any]] = []

    def submit(self, signal: Signal, resource: Any, item: Any) -> bool:
        self.items.append((signal, resource, item))
        return True

    def submit_request(self, signal: Signal, request: Any) -> bool:
        self.items.append((signal, None, request))
        return True


def _ctx(config: dict | None = None) -> tuple[SourceContext, RecordingConsumer]:
    consumer = RecordingConsumer()
    return SourceContext(EbpfConfig.from_dict(config or {}, environ={}), consumer, SelfTelemetry(),
                         KernelClock()), consumer


def _v4_mapped(addr: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(addr)


def _net_event(sent: int, received: int, resets_received: int = 0) -> NetEvent:
    ev = NetEvent(sk=0xFFFF888000001234)
    c = ev.c
    c.start_ns, c.end_ns = 1_000_000_000, 1_250_000_000
    c.bytes_sent, c.bytes_received, c.resets_received = sent, received, resets_received
    c.pid, c.local_port, c.peer_port, c.family = 4242, 40000, 8080, socket.AF_INET
    c.direction, c.flags = NET_DIR_CLIENT, NET_F_ESTABLISHED
    ctypes.memmove(c.local_addr, _v4_mapped("127.0.0.1"), 16)
    ctypes.memmove(c.peer_addr, _v4_mapped("10.1.2.3"), 16)
    c.comm = b"curl"
    return ev


def test_network_source_hands_on_a_decoded_connection_and_its_metrics() -> None:
    ctx, consumer = _ctx()
    source = NetworkSource(ctx)
    ev = _net_event(sent=100, received=2000)
    source.handle_event(ctypes.addressof(ev), ctypes.sizeof(ev))
    (rec,) = consumer.events
    assert isinstance(rec, TcpConnection) and rec.finished and rec.client
    assert (rec.pid, rec.comm, rec.network_type) == (4242, "curl", "ipv4")
    assert (rec.local_address, rec.local_port) == ("127.0.0.1", 40000)
    assert (rec.peer_address, rec.peer_port) == ("10.1.2.3", 8080)
    assert (rec.sent_bytes, rec.received_bytes, rec.duration_ns, rec.outcome) == (100, 2000, 250_000_000, "ok")
    source._export_metrics()
    (snap,) = consumer.snapshots
    assert isinstance(snap, ConnectionSnapshot)
    ((_key, series),) = snap.by_pid[4242]
    assert (series.opened, series.sent, series.received, series.closed) == (1, 100, 2000, {"ok": 1})
    assert snap.finished_pids == {4242}   # no such process here: its series go out one last time


def test_process_source_hands_on_exec_with_argv() -> None:
    ctx, consumer = _ctx()
    source = ProcessSource(ctx)
    ev = ExecEvent()
    ev.hdr.type, ev.hdr.pid, ev.hdr.tid, ev.hdr.ppid = PROC_EVENT_EXEC, 77, 77, 1
    ev.hdr.comm = b"curl"
    ev.filename = b"/usr/bin/curl"
    args = [b"curl", b"--password=hunter2", b"http://x"]
    base = ctypes.addressof(ev) + ExecEvent.argv.offset + type(ev.argv).args.offset
    for i, a in enumerate(args):
        ctypes.memmove(base + i * PROC_ARG_LEN, a, len(a))
    ev.argv.argc = len(args)
    source.handle_event(ctypes.addressof(ev), ctypes.sizeof(ev))
    (rec,) = consumer.events
    assert isinstance(rec, ProcessRecord) and rec.kind is EbpfEventType.PROCESS_EXEC
    assert rec.executable_path == "/usr/bin/curl" and rec.parent_pid == 1
    assert rec.argv == ["curl", "--password=hunter2", "http://x"]   # redaction is the pipeline's rule


def test_syscalls_source_hands_on_a_named_slow_call() -> None:
    ctx, consumer = _ctx()
    source = SyscallsSource(ctx)
    ev = ScSlowEvent(start_ns=5, end_ns=50_000_005, ret=-11, pid=9, tid=10, nr=0, comm=b"app")
    source.handle_event(ctypes.addressof(ev), ctypes.sizeof(ev))
    (rec,) = consumer.events
    assert rec == SlowSyscall(9, 10, "app", 0, "read", -11, ctx.clock.to_unix_nano(5), 50_000_000)


def _span_fields(span: Any) -> tuple:
    return (span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano,
            sorted((kv.key, str(kv.value)) for kv in span.attributes), span.status.code)


def test_a_connection_is_the_same_span_through_the_pipeline_and_the_library() -> None:
    """One set of rules: the agent's pipeline and ``EbpfOtlpConverter`` give the same span."""
    ctx, consumer = _ctx()
    source = NetworkSource(ctx)
    for resets in (0, 1):
        ev = _net_event(sent=5, received=6, resets_received=resets)
        source.handle_event(ctypes.addressof(ev), ctypes.sizeof(ev))
    sink = RecordingSink()
    pipeline = Pipeline(ctx.config, sink, ProcessResources({"host.name": "h"}))
    for rec in consumer.events:
        pipeline.consume_event(rec)
    assert [s for s, _r, _i in sink.items] == [Signal.TRACES, Signal.TRACES]
    library = EbpfOtlpConverter()
    for rec, (_s, _res, span) in zip(consumer.events, sink.items):
        assert _span_fields(span) == _span_fields(library.span_proto(connection_event(rec)))
    assert sink.items[1][2].status.code == 2   # the reset connection is an error either way


def test_pipeline_redacts_and_renews_identity_at_exec() -> None:
    sink = RecordingSink()
    resources = ProcessResources({"host.name": "h"})
    config = EbpfConfig.from_dict({}, environ={})
    pipeline = Pipeline(config, sink, resources)
    pid = 2**22 - 3   # no such process: identity comes from the records alone
    fork = ProcessRecord(EbpfEventType.PROCESS_FORK, pid, pid, 1, "bash", parent_pid=1)
    pipeline.consume_event(fork)
    exec_ = ProcessRecord(EbpfEventType.PROCESS_EXEC, pid, pid, 2, "curl", executable_path="/usr/bin/curl",
                          argv=["curl", "--token", "s3cret"])
    pipeline.consume_event(exec_)
    (_s, fork_res, _), (_s2, exec_res, log) = sink.items
    names = [next(kv.value.string_value for kv in r.attributes if kv.key == "process.executable.name")
             for r in (fork_res, exec_res)]
    assert names == ["bash", "curl"]
    attrs = {kv.key: kv.value for kv in log.attributes}
    assert attrs["process.command_line"].string_value == "curl --token REDACTED"


def test_mirror_check_fails_loudly_on_a_mismatch() -> None:
    class Theirs(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint64)]

    class Ours(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    class Map:
        Leaf = Theirs

    check_mirror({"m": Map}, "m", "Leaf", Theirs, "test")   # the same layout passes
    with pytest.raises(SourceUnavailableError, match="a at offset 0 size 8 here, offset 0 size 4 there"):
        check_mirror({"m": Map}, "m", "Leaf", Ours, "test")
