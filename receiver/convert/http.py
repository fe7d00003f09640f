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
import struct
from collections.abc import Iterator
from functools import lru_cache
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


# ---------------------------------------------------------------- the span, in protobuf's wire format
# A request's span is encoded here field by field (trace.proto: Span, KeyValue, AnyValue, Status)
# and parsed once, instead of being built attribute by attribute through the message API (about
# four times the cost, and this runs for every request on each side). Attributes whose values
# repeat (endpoints, method, status, scheme) are encoded once and kept, bounded.
_Q = struct.Struct("<Q")
_KIND = {True: b"\x30" + bytes((Span.SPAN_KIND_SERVER,)), False: b"\x30" + bytes((Span.SPAN_KIND_CLIENT,))}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited field (``tag``: field number << 3 | 2, below 16)."""
    n = len(data)
    return bytes((tag, n)) + data if n < 0x80 else bytes((tag,)) + _varint(n) + data


def _string_attribute(key: bytes, value: str) -> bytes:
    return _field(0x4A, key + _field(0x12, _field(0x0A, value.encode("utf-8", "replace"))))


@lru_cache(maxsize=4096)
def _cached_string_attribute(key: str, value: str) -> bytes:
    return _string_attribute(_field(0x0A, key.encode()), value)


@lru_cache(maxsize=4096)
def _int_attribute(key: str, value: int) -> bytes:
    return _field(0x4A, _field(0x0A, key.encode()) + _field(0x12, b"\x18" + _varint(value & _U64_MASK)))


@lru_cache(maxsize=64)
def _name(name: str) -> bytes:
    return _field(0x2A, name.encode())


_URL_PATH_KEY = _field(0x0A, b"url.path")


@lru_cache(maxsize=4096)
def _connection_attributes(scheme: str, version: str, server_address: str, server_port: int, client_address: str,
                           client_port: int) -> bytes:
    """The attributes every request of one connection shares, encoded once per connection."""
    sa = _cached_string_attribute
    return b"".join((sa("url.scheme", scheme), sa("network.protocol.name", "http"),
                     sa("network.protocol.version", version), sa("server.address", server_address),
                     _int_attribute("server.port", server_port), sa("client.address", client_address),
                     _int_attribute("client.port", client_port)))


def request_span(r: HttpRequest) -> Span:
    """The span of one request (encoded as described above)."""
    method = normal_method(r.method)
    sa = _cached_string_attribute
    parts = [_KIND[r.server], b"\x39", _Q.pack(r.start_unix_nano), b"\x41", _Q.pack(r.start_unix_nano + r.duration_ns),
             _name("HTTP" if method == "_OTHER" else method), sa("http.request.method", method)]
    if method == "_OTHER":
        parts.append(_string_attribute(_field(0x0A, b"http.request.method_original"), r.method))
    if r.status:
        parts.append(_int_attribute("http.response.status_code", r.status))
    parts += (_string_attribute(_URL_PATH_KEY, r.path),
              _connection_attributes(r.scheme, r.version, r.server_address, r.server_port, r.client_address,
                                     r.client_port))
    err = error_type(r.server, r.status, r.error)
    if err:
        parts.append(sa("error.type", err))
        message = (r.error or f"HTTP {r.status}").encode("utf-8", "replace")
        parts.append(_field(0x7A, _field(0x12, message) + b"\x18" + bytes((Status.STATUS_CODE_ERROR,))))
    trace_id, span_id, parent = r.trace_id, r.span_id, r.parent_span_id
    if trace_id is None:   # else decided by the source (e.g. a child of the serving request)
        joined = parse_traceparent(r.traceparent)
        if joined is not None:
            trace_id, parent = joined
    if trace_id is None or span_id is None:
        bits = _rand.getrandbits(192)
        if trace_id is None:
            trace_id = (bits >> 64).to_bytes(16, "little")
        if span_id is None:
            span_id = (bits & _U64_MASK).to_bytes(8, "little")
    parts += (b"\x0a\x10", trace_id, b"\x12\x08", span_id)
    if parent:
        parts += (b"\x22\x08", parent)
    return Span.FromString(b"".join(parts))


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
