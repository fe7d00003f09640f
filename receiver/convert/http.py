"""HTTP requests → OTLP, by the semantic conventions for HTTP spans and metrics.

A request seen on the receiving side is a SERVER span, on the sending side a CLIENT span, named
``{method}`` (no route is known; ``HTTP`` for a method outside the known set, which is then
``_OTHER`` with ``http.request.method_original``). Attributes: ``http.request.method``,
``url.path`` (never the query), ``url.scheme``, ``http.response.status_code``,
``network.protocol.name``/``version``, ``server.address``/``port``, ``client.address``/``port``.
Error status: 5xx on servers, 4xx and 5xx on clients (``error.type`` the status code), and
requests that got no response (``error.type`` ``connection_closed``).

A valid W3C ``traceparent`` on the request puts the span in the caller's trace, its parent the
caller's span. Ids the source decided (``trace_id``/``span_id``/``parent_span_id`` of the record:
a CLIENT request made by a thread while it served a request is a child of that SERVER span) take
precedence.

Metrics: ``http.server.request.duration`` and ``http.client.request.duration``, cumulative
explicit-bucket histograms in seconds with the conventions' boundaries, by method, status,
server address/port, protocol version, scheme and error type; no paths.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ..records import HttpRequest, HttpSeriesKey, HttpSnapshot
from .durations import CUMULATIVE, DURATION_BOUNDARIES, duration_metrics

__all__ = ["KNOWN_METHODS", "DURATION_BOUNDARIES", "CUMULATIVE", "request_span", "error_type",
           "parse_traceparent", "new_span", "join_traceparent", "normal_method", "snapshot_metrics"]

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_U64_MASK = 2**64 - 1
_rand = random.Random()


def normal_method(method: str) -> str:
    return method if method in KNOWN_METHODS else "_OTHER"


def error_type(server: bool, status: int, error: str | None) -> str:
    """``error.type`` of a request: its status code when that is an error on this side, else ""."""
    if error is not None and status == 0:
        return "connection_closed"
    if status >= 500 or (not server and status >= 400):
        return str(status)
    return ""


def parse_traceparent(value: str | None) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a valid W3C traceparent (version 00, or a later one read as
    00), else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value)
    if m is None or m.group(1) == "ff" or m.group(2) == _ZERO_TRACE or m.group(3) == _ZERO_SPAN:
        return None
    if m.group(1) == "00" and len(value) != 55:
        return None
    return bytes.fromhex(m.group(2)), bytes.fromhex(m.group(3))


def new_span(name: str, server: bool, start_unix_nano: int, duration_ns: int) -> Span:
    """A SERVER (or CLIENT) span with fresh random ids, no attributes yet."""
    bits = _rand.getrandbits(192)
    return Span(trace_id=(bits >> 64).to_bytes(16, "little"), span_id=(bits & _U64_MASK).to_bytes(8, "little"),
                name=name, kind=Span.SPAN_KIND_SERVER if server else Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=start_unix_nano, end_time_unix_nano=start_unix_nano + duration_ns)


def join_traceparent(span: Span, traceparent: str | None) -> Span:
    """``span`` in the caller's trace, its parent the caller's span, when ``traceparent`` is valid."""
    parent = parse_traceparent(traceparent)
    if parent is not None:
        span.trace_id, span.parent_span_id = parent
    return span


def request_span(r: HttpRequest) -> Span:
    """The span of one request. Built in place (attributes added to the message, no
    intermediate dicts or ``SpanSpec``): this runs once per request on each side, three to four
    times cheaper than through ``span_proto``."""
    method = normal_method(r.method)
    span = new_span("HTTP" if method == "_OTHER" else method, r.server, r.start_unix_nano, r.duration_ns)
    add = span.attributes.add
    add(key="http.request.method").value.string_value = method
    if method == "_OTHER":
        add(key="http.request.method_original").value.string_value = r.method
    if r.status:
        add(key="http.response.status_code").value.int_value = r.status
    add(key="url.path").value.string_value = r.path
    add(key="url.scheme").value.string_value = r.scheme
    add(key="network.protocol.name").value.string_value = "http"
    add(key="network.protocol.version").value.string_value = r.version
    add(key="server.address").value.string_value = r.server_address
    add(key="server.port").value.int_value = r.server_port
    add(key="client.address").value.string_value = r.client_address
    add(key="client.port").value.int_value = r.client_port
    err = error_type(r.server, r.status, r.error)
    if err:
        add(key="error.type").value.string_value = err
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = r.error or f"HTTP {r.status}"
    if r.trace_id is not None:   # decided by the source (e.g. a child of the serving request)
        span.trace_id = r.trace_id
        if r.span_id is not None:
            span.span_id = r.span_id
        if r.parent_span_id is not None:
            span.parent_span_id = r.parent_span_id
        return span
    return join_traceparent(span, r.traceparent)


def _attributes(key: HttpSeriesKey) -> dict[str, Any]:
    _server, method, status, address, port, version, scheme, err = key
    if not method:   # the overflow series of its side
        return {"otel.metric.overflow": True}
    attrs: dict[str, Any] = {"http.request.method": method}
    if status:
        attrs["http.response.status_code"] = status
    attrs.update({"server.address": address, "server.port": port, "network.protocol.name": "http",
                  "network.protocol.version": version, "url.scheme": scheme})
    if err:
        attrs["error.type"] = err
    return attrs


_SIDES = ((True, "http.server.request.duration", "Duration of HTTP server requests"),
          (False, "http.client.request.duration", "Duration of HTTP client requests"))


def snapshot_metrics(snapshot: HttpSnapshot) -> Iterator[tuple[int, list[Metric]]]:
    """(pid, metrics) for every process of a snapshot (pid 0: the overflow series)."""
    return duration_metrics(snapshot, _attributes, _SIDES)
