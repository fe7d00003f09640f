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

import random
from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ..records import RpcCall, RpcSeries, RpcSeriesKey, RpcSnapshot
from .durations import DurationHistograms, duration_metrics
from .http import join_traceparent, new_span

__all__ = ["RpcCall", "RpcSeriesKey", "RpcSeries", "RpcSnapshot", "call_span", "split_path", "error_type",
           "RpcMetrics", "snapshot_metrics", "SERVER_ERROR_CODES"]

# Status codes that are errors on the server side (the conventions' list for gRPC servers).
SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})


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


MAX_TEMPLATES = 1024   # spans' constant parts kept (calls of one method on one connection share one)
_templates: dict[tuple[Any, ...], bytes] = {}
_rand = random.Random()
_U64_MASK = 2**64 - 1


def call_span(r: RpcCall) -> Span:
    """The span of one call. Calls of a method on one connection differ only in their ids and
    times: their name, kind, attributes and status are parsed from a serialised template (a
    fifth of the cost of adding ten attributes), bounded by ``MAX_TEMPLATES``."""
    key = (r.server, r.service, r.method, r.http_status, r.grpc_status, r.error, r.server_address, r.server_port,
           r.client_address, r.client_port)
    blob = _templates.get(key)
    if blob is None:
        if len(_templates) >= MAX_TEMPLATES:
            _templates.clear()
        blob = _templates[key] = _template(r).SerializeToString()
    span = Span.FromString(blob)
    bits = _rand.getrandbits(192)
    span.trace_id = (bits >> 64).to_bytes(16, "little")
    span.span_id = (bits & _U64_MASK).to_bytes(8, "little")
    span.start_time_unix_nano = r.start_unix_nano
    span.end_time_unix_nano = r.start_unix_nano + r.duration_ns
    return join_traceparent(span, r.traceparent) if r.traceparent else span


def _template(r: RpcCall) -> Span:
    """A call's span without ids and times."""
    span = new_span(f"{r.service}/{r.method}", r.server, 0, 0)
    span.ClearField("trace_id")
    span.ClearField("span_id")
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
    return span


def _overflow_key(key: RpcSeriesKey) -> RpcSeriesKey:
    return key[0], "", "", 0, "", 0


class RpcMetrics(DurationHistograms):
    """Cumulative call-duration histograms per process and attribute set, at most
    ``max_attribute_sets`` of them; beyond, one overflow series per side (under pid 0)."""

    def __init__(self, max_attribute_sets: int):
        super().__init__(max_attribute_sets, _overflow_key)


def _attributes(key: RpcSeriesKey) -> dict[str, Any]:
    _server, service, method, status, address, port = key
    if not service:
        return {"otel.metric.overflow": True}
    attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if status >= 0:
        attrs["rpc.grpc.status_code"] = status
    attrs.update({"server.address": address, "server.port": port})
    return attrs


_SIDES = ((True, "rpc.server.call.duration", "Duration of gRPC calls received"),
          (False, "rpc.client.call.duration", "Duration of gRPC calls made"))


def snapshot_metrics(snapshot: RpcSnapshot) -> Iterator[tuple[int, list[Metric]]]:
    """(pid, metrics) for every process of a snapshot (pid 0: the overflow series)."""
    return duration_metrics(snapshot, _attributes, _SIDES)
