"""The one stage between sources and export, as a Collector pipeline is between a receiver and an
exporter: sources hand typed records (``receiver.records``) and profiles to a ``Consumer``; the
``Pipeline`` looks up who did it (resources), applies the conversion rules of
``receiver.convert`` (the same ones the library's ``EbpfOtlpConverter`` uses) and submits the
result to a ``Sink`` (the exporter, or a recorder in tests).

Once handed over, a record belongs to the pipeline. Nothing here blocks: sinks queue.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .config import EbpfConfig
from .consumer import Consumer, Sink
from .convert import http, logs, network, rpc, syscalls
from .convert.attributes import to_key_values
from .convert.spec import span_proto
from .kernel.identity import CgroupResolver, process_attributes
from .model import EbpfEventType, Signal
from .profiling.model import CpuProfile
from .records import (
    ConnectionSnapshot,
    HttpRequest,
    HttpSnapshot,
    MetricSnapshot,
    ProcessRecord,
    Record,
    RpcCall,
    RpcSnapshot,
    SlowSyscall,
    SyscallSnapshot,
    TcpConnection,
)

__all__ = ["Sink", "Consumer", "Pipeline", "ProcessResources"]


class ProcessResources:
    """pid → OTLP ``Resource`` (host attributes + ``process.*`` + ``container.id``), bounded LRU.

    The same ``Resource`` object is returned for a pid until it is forgotten (at exec and exit,
    and when a source finds the process gone), so the exporter can group items by resource
    identity without comparing contents, and a recycled pid never inherits stale identity.

    An entry made between fork and exec (the child still runs the parent's program) must not
    outlive the exec, whatever order the sources' ring buffers are read in: each entry keeps the
    comm values known to belong to its executable, and an event whose comm is not among them
    has the executable checked again (/proc/PID/exe, or the path the event carries); a
    different one means a new program and a new entry. Threads that rename themselves cost one
    check per new name (up to ``_MAX_COMMS`` per entry)."""

    _MAX_COMMS = 16
    SWEEP_INTERVAL = 10.0   # seconds between two looks for entries of processes that are gone

    def __init__(self, host_attributes: Mapping[str, Any], max_entries: int = 4096,
                 cgroups: CgroupResolver | None = None):
        self.host_attributes = dict(host_attributes)
        self.host_resource = Resource(attributes=to_key_values(self.host_attributes))
        self.max_entries = max_entries
        self.cgroups = cgroups or CgroupResolver()
        # pid → (resource, executable path it was built with, comm values seen for it)
        self._cache: OrderedDict[int, tuple[Resource, str | None, set[str]]] = OrderedDict()
        self.evictions = 0   # least recently used entries dropped at max_entries
        self._swept_at = time.monotonic()
        self._gone: set[int] = set()   # pids found gone at the last sweep

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, pid: int, comm: str = "", executable_path: str | None = None,
            cgroup_id: int = 0, extra: Mapping[str, Any] | None = None) -> Resource:
        if pid <= 0:
            return self.host_resource
        entry = self._cache.get(pid)
        if entry is not None:
            res, exe, comms = entry
            if not comm or comm in comms or self._same_program(pid, exe, executable_path, comm, comms):
                self._cache.move_to_end(pid)
                return res
        attrs = process_attributes(pid, comm, executable_path, cgroup_id, self.cgroups)
        res = Resource(attributes=to_key_values({**self.host_attributes, **attrs, **(extra or {})}))
        exe = attrs.get("process.executable.path")
        comms = {c for c in (comm, os.path.basename(exe)[:15] if exe else "") if c}
        self._cache[pid] = (res, exe, comms)
        self._cache.move_to_end(pid)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
            self.evictions += 1
        return res

    def _same_program(self, pid: int, exe: str | None, executable_path: str | None, comm: str,
                      comms: set[str]) -> bool:
        """Whether ``pid`` still runs the executable its entry was built for (a new comm may be a
        renamed thread, or an exec)."""
        now = executable_path
        if now is None:
            try:
                now = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                now = None   # gone: the comm the event carries is the better name
        if now is None or now != exe:
            return False
        if len(comms) < self._MAX_COMMS:
            comms.add(comm)
        return True

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)

    def sweep(self) -> None:
        """Forgets the entries of processes found gone at two sweeps in a row. A record read
        after its process's exit (a late profile sample, slow call or connection) makes an entry
        that no exit event will drop; without this such entries fill the cache to its bound.
        Two sweeps: records of the last seconds of a process still find its identity."""
        now = time.monotonic()
        if now - self._swept_at < self.SWEEP_INTERVAL:
            return
        self._swept_at = now
        gone = {pid for pid in self._cache if not os.path.exists(f"/proc/{pid}")}
        for pid in gone & self._gone:
            del self._cache[pid]
        self._gone = gone - self._gone


class Pipeline:
    """Records → (resource, OTLP item) → sink, by the rules of ``receiver.convert``."""

    def __init__(self, config: EbpfConfig, sink: Sink, resources: ProcessResources):
        self.config = config
        self.sink = sink
        self.resources = resources
        net = config.sources.network
        self._connection_spans = net.spans
        self._min_span_ns = int(net.min_span_duration * 1e9)
        self._event_rules: dict[type, Callable[[Any], None]] = {
            ProcessRecord: self._process, TcpConnection: self._connection, SlowSyscall: self._slow_syscall,
            HttpRequest: self._http_request, RpcCall: self._rpc_call,
        }
        self._snapshot_rules: dict[type, Callable[[Any], Any]] = {
            SyscallSnapshot: syscalls.snapshot_metrics, ConnectionSnapshot: network.snapshot_metrics,
            HttpSnapshot: http.snapshot_metrics, RpcSnapshot: rpc.snapshot_metrics,
        }

    # ------------------------------------------------------------------ Consumer

    def consume_event(self, record: Record) -> None:
        self._event_rules[type(record)](record)

    def consume_metrics(self, snapshot: MetricSnapshot) -> None:
        comms = _snapshot_comms(snapshot)
        for pid, metrics in self._snapshot_rules[type(snapshot)](snapshot):
            resource = self.resources.get(pid, comms.get(pid, "")) if pid else self.resources.host_resource
            for m in metrics:
                self.sink.submit(Signal.METRICS, resource, m)
        for pid in snapshot.finished_pids:
            self.resources.forget(pid)
        self.resources.sweep()

    def consume_profile(self, profile: CpuProfile) -> None:
        if not profile.samples:
            return
        from .convert.profiles import profile_requests  # pprof protos: only with the profiler

        names = {s.pid: s.process_name for s in profile.samples}
        for request in profile_requests(profile, lambda pid: self.resources.get(pid, names.get(pid, "")),
                                        self.config.exporter.max_request_bytes):
            self.sink.submit_request(Signal.PROFILES, request)
        self.resources.sweep()

    # ------------------------------------------------------------------ per record type

    def _process(self, rec: ProcessRecord) -> None:
        cfg = self.config.sources.process
        event = logs.process_event(rec, cfg.command_line, cfg.max_args)
        if rec.kind is EbpfEventType.PROCESS_EXEC:
            self.resources.forget(rec.pid)   # a new program: new identity
        extra = {"process.parent_pid": rec.parent_pid} if rec.parent_pid else None
        resource = self.resources.get(rec.pid, rec.comm, rec.executable_path, rec.cgroup_id, extra)
        if rec.kind is EbpfEventType.PROCESS_EXIT:
            self.resources.forget(rec.pid)
        self.sink.submit(Signal.LOGS, resource, logs.process_event_to_log(event))

    def _connection(self, rec: TcpConnection) -> None:
        if not (rec.finished and self._connection_spans and rec.duration_ns >= self._min_span_ns):
            return
        # The library's rules, called directly: records made here need no checking per event.
        spec = network.connection_span(network.connection_event(rec))
        if spec is not None:
            resource = self.resources.get(rec.pid, rec.comm, cgroup_id=rec.cgroup_id)
            self.sink.submit(Signal.TRACES, resource, span_proto(spec))

    def _http_request(self, rec: HttpRequest) -> None:
        resource = self.resources.get(rec.pid, rec.comm, cgroup_id=rec.cgroup_id)
        self.sink.submit(Signal.TRACES, resource, http.request_span(rec))

    def _rpc_call(self, rec: RpcCall) -> None:
        resource = self.resources.get(rec.pid, rec.comm, cgroup_id=rec.cgroup_id)
        self.sink.submit(Signal.TRACES, resource, rpc.call_span(rec))

    def _slow_syscall(self, rec: SlowSyscall) -> None:
        spec = syscalls.syscall_span(syscalls.slow_syscall_event(rec))
        self.sink.submit(Signal.TRACES, self.resources.get(rec.pid, rec.comm), span_proto(spec))


def _snapshot_comms(snapshot: MetricSnapshot) -> dict[int, str]:
    if isinstance(snapshot, ConnectionSnapshot):
        return {pid: series[0][1].comm for pid, series in snapshot.by_pid.items() if series}
    return {pid: s.comm for pid, s in snapshot.by_pid.items()}
