"""OTLP/HTTP (``http/protobuf`` and ``http/json``): the push function over one aiohttp
session, whose connection pool keeps HTTP/1.1 connections alive between requests. Queue,
batching and retries are the exporter's; here a request is encoded (and gzipped) once, POSTed,
and the response classified as the OTLP/HTTP specification says: 2xx is success (a partial
success in the body is read), 429/502/503/504 are retryable honouring ``Retry-After``, any other
status is permanent, a connection failure or a timeout is retryable."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import zlib
from typing import Any

import aiohttp
from google.protobuf import json_format
from google.rpc import status_pb2

from .._version import __version__
from ..config import ExporterConfig
from ..errors import RetryableExportError
from ..model import Signal
from .retry import classify_http_status
from .signals import SPECS
from .transport import PushResult, Route

__all__ = ["HttpTransport", "encode_json"]

_USER_AGENT = f"ebpf-otlp-receiver/{__version__}"
# OTLP/JSON writes these byte fields as hex, not as proto3 JSON's base64.
_HEX_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "profileId"})


def _hex_ids(node: Any) -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _HEX_FIELDS and isinstance(v, str):
                node[k] = base64.b64decode(v).hex()
            elif isinstance(v, (dict, list)):
                _hex_ids(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _hex_ids(v)
    return node


def encode_json(request: Any) -> bytes:
    """OTLP/JSON: proto3 JSON with lowerCamelCase keys, enums as integers, ids as hex."""
    d = json_format.MessageToDict(request, use_integers_for_enums=True)
    return json.dumps(_hex_ids(d), separators=(",", ":")).encode()


def _ssl_context(route: Route) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=route.ca_file)
    if route.cert_file and route.key_file:
        ctx.load_cert_chain(route.cert_file, route.key_file)
    return ctx


def _status_message(body: bytes, content_type: str) -> str:
    """The ``google.rpc.Status`` message a failed OTLP/HTTP response carries, else its text."""
    try:
        if "json" in content_type:
            return str(json.loads(body).get("message") or body[:200].decode(errors="replace"))
        if "protobuf" in content_type:
            return status_pb2.Status.FromString(body).message
    except Exception:  # noqa: BLE001, S110 - an undecodable body still has its text below
        pass
    return body[:200].decode(errors="replace").strip()


class HttpTransport:
    """One ``aiohttp.ClientSession`` for every signal with the same TLS settings."""

    def __init__(self, route: Route, config: ExporterConfig):
        self.route = route
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[Route, dict[str, str]] = {}

    async def start(self) -> None:
        tls = _ssl_context(self.route) if (self.route.ca_file or self.route.cert_file) else True
        connector = aiohttp.TCPConnector(ssl=tls, limit=16, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)

    def _request_headers(self, route: Route) -> dict[str, str]:
        h = self._headers.get(route)
        if h is None:
            h = {"User-Agent": _USER_AGENT,
                 "Content-Type": "application/json" if route.protocol == "http/json"
                 else "application/x-protobuf"}
            if route.compression == "gzip":
                h["Content-Encoding"] = "gzip"
            h.update(route.headers)
            self._headers[route] = h
        return h

    def encode(self, route: Route, request: Any) -> bytes:
        data = encode_json(request) if route.protocol == "http/json" else request.SerializeToString()
        if route.compression == "gzip":
            # Level 1: the fastest; telemetry compresses well at any level, and this runs on
            # the event loop.
            data = zlib.compress(data, 1, wbits=31)
        return data

    async def push(self, route: Route, data: bytes, timeout: float) -> PushResult:
        assert self._session is not None, "start() first"
        try:
            async with self._session.post(route.url, data=data, headers=self._request_headers(route),
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.read()
                status, content_type = resp.status, resp.headers.get("Content-Type", "")
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            raise RetryableExportError(f"no response within {timeout:.1f}s from {route.url}",
                                       "DEADLINE_EXCEEDED") from None
        except aiohttp.ClientError as e:  # refused, reset, TLS handshake, bad response
            raise RetryableExportError(f"{type(e).__name__}: {e}", "UNAVAILABLE") from None
        if not 200 <= status < 300:
            raise classify_http_status(status, _status_message(body, content_type) or f"HTTP {status}",
                                       retry_after)
        return self._result(route.signal, status, body, content_type)

    @staticmethod
    def _result(signal: Signal, status: int, body: bytes, content_type: str) -> PushResult:
        if not body:
            return PushResult(str(status))
        spec = SPECS[signal]
        try:
            if "json" in content_type:
                response = json_format.Parse(body, spec.response(), ignore_unknown_fields=True)
            else:
                response = spec.response.FromString(body)
        except Exception:  # noqa: BLE001 - accepted anyway; the body only says what was rejected
            return PushResult(str(status), 0, f"undecodable response body ({content_type})")
        if not response.HasField("partial_success"):
            return PushResult(str(status))
        ps = response.partial_success
        return PushResult(str(status), getattr(ps, spec.rejected_field, 0), ps.error_message)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            await asyncio.sleep(0)  # lets the connector close its sockets (aiohttp's advice)
