"""What sources hand to the pipeline: typed records of what the kernel saw, decoded but not yet
named in OpenTelemetry terms (the pipeline's conversion rules do that, once, for the agent and the
library alike).

- events: ``ProcessRecord``, ``TcpConnection``, ``SlowSyscall``, ``HttpRequest``, ``RpcCall``
  (one per thing that happened);
- metric snapshots: ``SyscallSnapshot``, ``ConnectionSnapshot``, ``HttpSnapshot``, ``RpcSnapshot``
  (cumulative aggregates, per process, at one report);
- profiles: ``receiver.profiling.model.CpuProfile``.

Times are Unix nanoseconds, already mapped from the kernel's monotonic clock by the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .aggregates import HistPoint, Series, SeriesKey
from .model import EbpfEventType

__all__ = ["ProcessRecord", "TcpConnection", "SlowSyscall", "SyscallSeries", "SyscallSnapshot",
           "ConnectionSnapshot", "HttpRequest", "HttpSeries", "HttpSnapshot", "DurationSeries",
           "DurationSnapshot", "RpcCall", "RpcSeriesKey", "RpcSeries", "RpcSnapshot", "Record", "MetricSnapshot"]


@dataclass(slots=True)
class ProcessRecord:
    """exec, exit, fork or OOM kill of a process."""

    kind: EbpfEventType
    pid: int
    tid: int
    time_unix_nano: int
    comm: str
    cgroup_id: int = 0
    parent_pid: int = 0
    executable_path: str | None = None     # exec: the new program
    argv: list[str] | None = None          # exec: as read, not yet redacted
    argv_truncated: bool = False
    exit_code: int | None = None           # exit: the code, when not killed by a signal
    exit_signal: int | None = None         # exit: the fatal signal


@dataclass(slots=True)
class TcpConnection:
    """One TCP connection: finished, or still open at a report (``finished`` False)."""

    pid: int
    comm: str
    cgroup_id: int
    start_unix_nano: int
    duration_ns: int
    finished: bool
    client: bool
    network_type: str          # "ipv4" or "ipv6"
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    established: bool
    sent_bytes: int = 0
    received_bytes: int = 0
    retransmits: int = 0
    resets_sent: int = 0
    resets_received: int = 0

    @property
    def outcome(self) -> str:
        """``ok``; ``refused`` (a reset answered the SYN); ``failed`` (never established for
        another reason); ``reset`` (a reset after it was established)."""
        if not self.established:
            return "refused" if self.resets_received else "failed"
        return "reset" if self.resets_received or self.resets_sent else "ok"


@dataclass(slots=True)
class SlowSyscall:
    """One system call slower than the source's threshold."""

    pid: int
    tid: int
    comm: str
    nr: int
    name: str
    ret: int
    start_unix_nano: int
    duration_ns: int


@dataclass(slots=True)
class SyscallSeries:
    """Cumulative syscall aggregates of one process (pid 0: the whole host)."""

    comm: str = ""   # the process's comm at its first counted call (it may be gone from /proc)
    calls: list[tuple[str, int]] = field(default_factory=list)              # (syscall, count)
    errors: list[tuple[str, str, int]] = field(default_factory=list)       # (syscall, errno, count)
    durations: list[tuple[str, HistPoint]] = field(default_factory=list)   # (syscall, histogram)


@dataclass(slots=True)
class SyscallSnapshot:
    start_unix_nano: int
    time_unix_nano: int
    by_pid: dict[int, SyscallSeries]
    finished_pids: set[int] = field(default_factory=set)   # gone: these were their last values


@dataclass(slots=True)
class ConnectionSnapshot:
    start_unix_nano: int
    time_unix_nano: int
    by_pid: dict[int, list[tuple[SeriesKey, Series]]]
    finished_pids: set[int] = field(default_factory=set)


@dataclass(slots=True)
class HttpRequest:
    """One HTTP request and its response, seen on the side of ``pid``: ``server`` when it
    received the request. ``status`` 0: no response (``error`` says why)."""

    pid: int
    comm: str
    cgroup_id: int
    start_unix_nano: int
    duration_ns: int
    server: bool
    method: str
    path: str
    scheme: str
    version: str
    status: int
    server_address: str
    server_port: int
    client_address: str
    client_port: int
    traceparent: str | None = None     # the request's header, not yet checked
    error: str | None = None
    # ids decided by the source (None: the conversion decides from ``traceparent``)
    trace_id: bytes | None = None
    span_id: bytes | None = None
    parent_span_id: bytes | None = None


# (server side, method, status code, server address, server port, protocol version, scheme,
#  error type); an empty method: the side's overflow series
HttpSeriesKey = tuple[bool, str, int, str, int, str, str, str]


@dataclass(slots=True)
class DurationSeries:
    """Cumulative duration histograms of one process: (key, bucket counts, sum in seconds,
    count) per attribute set (the key an ``HttpSeriesKey`` or an ``RpcSeriesKey``)."""

    comm: str = ""
    points: list[tuple[tuple, list[int], float, int]] = field(default_factory=list)


HttpSeries = DurationSeries


@dataclass(slots=True)
class DurationSnapshot:
    start_unix_nano: int
    time_unix_nano: int
    boundaries: tuple[float, ...]
    by_pid: dict[int, DurationSeries]
    finished_pids: set[int] = field(default_factory=set)


@dataclass(slots=True)
class HttpSnapshot(DurationSnapshot):
    """HTTP request durations (``HttpSeriesKey`` series)."""


@dataclass(slots=True)
class RpcCall:
    """One gRPC call (over HTTP/2), seen on the side of ``pid``: ``server`` when it received the
    call. ``grpc_status`` None: no trailers were read (``error`` says why), or the status was an
    HPACK entry the agent never saw."""

    pid: int
    comm: str
    cgroup_id: int
    start_unix_nano: int
    duration_ns: int
    server: bool
    service: str
    method: str
    http_status: int
    grpc_status: int | None
    server_address: str
    server_port: int
    client_address: str
    client_port: int
    traceparent: str | None = None
    error: str | None = None


# (server side, rpc.service, rpc.method, grpc status code (-1 unknown), server address, server
#  port); an empty service: the side's overflow series
RpcSeriesKey = tuple[bool, str, str, int, str, int]
RpcSeries = DurationSeries


@dataclass(slots=True)
class RpcSnapshot(DurationSnapshot):
    """gRPC call durations (``RpcSeriesKey`` series)."""


Record = ProcessRecord | TcpConnection | SlowSyscall | HttpRequest | RpcCall
MetricSnapshot = SyscallSnapshot | ConnectionSnapshot | HttpSnapshot | RpcSnapshot
