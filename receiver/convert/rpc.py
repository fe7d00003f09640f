"""gRPC calls → OTLP, by the semantic conventions for RPC spans and metrics (gRPC).

A call seen on the receiving side is a SERVER span, on the calling side a CLIENT span, named
``{rpc.service}/{rpc.method}`` (from the HTTP/2 ``:path``, ``/package.Service/Method``).
Attributes: ``rpc.system`` (``grpc``), ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``
(from the trailers; absent when they were not read), ``server.address``/``port``,
``client.address``/``port``, ``network.protocol.name``/``version`` (``http``/``2``). Error
status: on clients every non-OK status, on servers UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
INTERNAL, UNAVAILABLE and DATA_LOSS (``error.type`` the status code); calls without trailers
(reset, connection closed, HTTP status other than 200) are errors on both sides. A valid W3C
``traceparent`` joins the caller's trace, as for HTTP/1.x.

Metrics: ``rpc.server.call.duration`` and ``rpc.client.call.duration``, cumulative
explicit-bucket histograms in seconds (the HTTP duration boundaries), by ``rpc.system``,
service, method, status code and server address/port. Non-gRPC HTTP/2 requests are HTTP requests
(``receiver/convert/http.py``) with ``network.protocol.version`` ``2``.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import Histogram, HistogramDataPoint, Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from .attributes import to_key_values
from .http import CUMULATIVE, DURATION_BOUNDARIES, parse_traceparent

__all__ = ["RpcCall", "RpcSeriesKey", "RpcSeries", "RpcSnapshot", "call_span", "split_path", "error_type",
           "RpcMetrics", "snapshot_metrics", "SERVER_ERROR_CODES"]

# Status codes that are errors on the server side (the conventions' list for gRPC servers).
SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})
_U64_MASK = 2**64 - 1
_rand = random.Random()


# The records the http source hands on for gRPC (beside receiver/records.py's HttpRequest).


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


@dataclass(slots=True)
class RpcSeries:
    comm: str = ""
    points: list[tuple[RpcSeriesKey, list[int], float, int]] = field(default_factory=list)


@dataclass(slots=True)
class RpcSnapshot:
    start_unix_nano: int
    time_unix_nano: int
    boundaries: tuple[float, ...]
    by_pid: dict[int, RpcSeries]
    finished_pids: set[int] = field(default_factory=set)


def split_path(path: str) -> tuple[str, str]:
    """(rpc.service, rpc.method) of a gRPC ``:path`` (``/pkg.Service/Method``); ("", "") when it
    is not that shape."""
    service, sep, method = path[1:].rpartition("/")
    if not path.startswith("/") or not sep or not service or not method or "/" in service:
        return "", ""
    return service, method


def error_type(server: bool, http_status: int, grpc_status: int | None, error: str | None) -> str:
    if grpc_status is None:
        if error is not None:
            return "connection_closed" if "closed" in error else "stream_reset"
        return str(http_status) if http_status != 200 else ""
    if grpc_status and (not server or grpc_status in SERVER_ERROR_CODES):
        return str(grpc_status)
    return ""


def call_span(r: RpcCall) -> Span:
    """The span of one call, built in place (as ``http.request_span``)."""
    bits = _rand.getrandbits(192)
    span = Span(trace_id=(bits >> 64).to_bytes(16, "little"), span_id=(bits & _U64_MASK).to_bytes(8, "little"),
                name=f"{r.service}/{r.method}",
                kind=Span.SPAN_KIND_SERVER if r.server else Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=r.start_unix_nano, end_time_unix_nano=r.start_unix_nano + r.duration_ns)
    add = span.attributes.add
    add(key="rpc.system").value.string_value = "grpc"
    add(key="rpc.service").value.string_value = r.service
    add(key="rpc.method").value.string_value = r.method
    if r.grpc_status is not None:
        add(key="rpc.grpc.status_code").value.int_value = r.grpc_status
    add(key="network.protocol.name").value.string_value = "http"
    add(key="network.protocol.version").value.string_value = "2"
    add(key="server.address").value.string_value = r.server_address
    add(key="server.port").value.int_value = r.server_port
    add(key="client.address").value.string_value = r.client_address
    add(key="client.port").value.int_value = r.client_port
    err = error_type(r.server, r.http_status, r.grpc_status, r.error)
    if err:
        add(key="error.type").value.string_value = err
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = r.error or (f"gRPC status {r.grpc_status}" if r.grpc_status is not None
                                          else f"HTTP {r.http_status}")
    parent = parse_traceparent(r.traceparent)
    if parent is not None:
        span.trace_id, span.parent_span_id = parent
    return span


class RpcMetrics:
    """Cumulative call-duration histograms per process and attribute set, at most
    ``max_attribute_sets`` of them; beyond, one overflow series per side (under pid 0)."""

    def __init__(self, max_attribute_sets: int):
        self.max_attribute_sets = max_attribute_sets
        self.series: dict[tuple[int, RpcSeriesKey], list[Any]] = {}
        self.comms: dict[int, str] = {}
        self.overflowed = 0

    def observe(self, pid: int, comm: str, key: RpcSeriesKey, seconds: float) -> None:
        s = self.series.get((pid, key))
        if s is None:
            if len(self.series) >= self.max_attribute_sets:
                pid, key = 0, (key[0], "", "", 0, "", 0)
                self.overflowed += 1
                s = self.series.get((pid, key))
            if s is None:
                s = self.series[(pid, key)] = [[0] * (len(DURATION_BOUNDARIES) + 1), 0.0, 0]
                if pid:
                    self.comms.setdefault(pid, comm)
        s[0][bisect.bisect_left(DURATION_BOUNDARIES, seconds)] += 1
        s[1] += seconds
        s[2] += 1

    def by_pid(self) -> dict[int, RpcSeries]:
        out: dict[int, RpcSeries] = {}
        for (pid, key), (counts, total, count) in self.series.items():
            series = out.get(pid)
            if series is None:
                series = out[pid] = RpcSeries(self.comms.get(pid, ""))
            series.points.append((key, counts, total, count))
        return out

    def forget_pids(self, pids: set[int]) -> None:
        for k in [k for k in self.series if k[0] in pids]:
            del self.series[k]
        for pid in pids:
            self.comms.pop(pid, None)


def _attributes(key: RpcSeriesKey) -> dict[str, Any]:
    _server, service, method, status, address, port = key
    if not service:
        return {"otel.metric.overflow": True}
    attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if status >= 0:
        attrs["rpc.grpc.status_code"] = status
    attrs.update({"server.address": address, "server.port": port})
    return attrs


def snapshot_metrics(snapshot: RpcSnapshot) -> Iterator[tuple[int, list[Metric]]]:
    """(pid, metrics) for every process of a snapshot (pid 0: the overflow series)."""
    bounds = list(snapshot.boundaries)
    for pid, series in snapshot.by_pid.items():
        out = []
        for server, name, description in (
                (True, "rpc.server.call.duration", "Duration of gRPC calls received"),
                (False, "rpc.client.call.duration", "Duration of gRPC calls made")):
            points = [HistogramDataPoint(attributes=to_key_values(_attributes(key)),
                                         start_time_unix_nano=snapshot.start_unix_nano,
                                         time_unix_nano=snapshot.time_unix_nano, count=count, sum=total,
                                         bucket_counts=counts, explicit_bounds=bounds)
                      for key, counts, total, count in series.points if key[0] == server]
            if points:
                m = Metric(name=name, description=description, unit="s")
                m.histogram.CopyFrom(Histogram(aggregation_temporality=CUMULATIVE))
                m.histogram.data_points.extend(points)
                out.append(m)
        yield pid, out
