"""OTLP/gRPC: the push function over one ``grpc.aio`` channel (shared by the signals that go to
the same target with the same TLS settings). Queue, batching and retries are the exporter's."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from .._version import __version__
from ..config import ExporterConfig
from ..errors import PermanentExportError
from ..model import Signal
from .retry import classify_rpc_error
from .signals import SCOPE, SPECS
from .transport import PushResult, Route

__all__ = ["SCOPE", "GrpcTransport"]

log = logging.getLogger(__name__)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class GrpcTransport:
    """Requests go in already serialized: encoded once, reused on every retry."""

    def __init__(self, route: Route, config: ExporterConfig):
        self.route = route
        self.max_request_bytes = config.max_request_bytes
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[Signal, Any] = {}

    async def start(self) -> None:
        r = self.route
        options = [("grpc.max_send_message_length", self.max_request_bytes + 1024 * 1024),
                   ("grpc.keepalive_time_ms", 30000),
                   ("grpc.primary_user_agent", f"ebpf-otlp-receiver/{__version__}")]
        if r.use_tls:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(r.ca_file),
                                                 private_key=_read(r.key_file),
                                                 certificate_chain=_read(r.cert_file))
            self._channel = grpc.aio.secure_channel(r.url, creds, options)
        else:
            self._channel = grpc.aio.insecure_channel(r.url, options)
        for s, spec in SPECS.items():
            self._calls[s] = self._channel.unary_unary(spec.grpc_method, request_serializer=None,
                                                       response_deserializer=spec.response.FromString)

    def encode(self, route: Route, request: Any) -> bytes:
        return request.SerializeToString()

    async def push(self, route: Route, data: bytes, timeout: float) -> PushResult:
        compression = grpc.Compression.Gzip if route.compression == "gzip" else grpc.Compression.NoCompression
        try:
            response = await self._calls[route.signal](data, timeout=timeout, metadata=route.headers,
                                                       compression=compression)
        except grpc.RpcError as e:
            error = classify_rpc_error(e)
            if "http1.x server" in str(error):  # an OTLP/HTTP port (4318) spoken to in gRPC
                hint = ("the endpoint speaks HTTP/1.1: an OTLP/HTTP port? set "
                        "exporter.protocol: http/protobuf, or use the gRPC port")
                error.args = (f"{error} ({hint})",)
            raise error from None
        except Exception as e:  # noqa: BLE001 - e.g. a header value gRPC refuses: never retried
            raise PermanentExportError(f"{type(e).__name__}: {e}", "INTERNAL") from None
        if not response.HasField("partial_success"):
            return PushResult("OK")
        ps = response.partial_success
        return PushResult("OK", getattr(ps, SPECS[route.signal].rejected_field, 0), ps.error_message)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
