"""What the exporter and its transports share: where a signal goes (``Route``, resolved from the
config), what a push returns, and the ``Transport`` interface. Transports import only this, not
the exporter, so there is no import circle between them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import ExporterConfig
from ..model import Signal
from .signals import SPECS

__all__ = ["Route", "PushResult", "Transport", "resolve_route"]


@dataclass(frozen=True)
class Route:
    """Where and how one signal is sent, resolved from the config: ``url`` is the full OTLP/HTTP
    URL, or the ``host:port`` a gRPC channel dials."""

    signal: Signal
    protocol: str
    url: str
    use_tls: bool
    headers: tuple[tuple[str, str], ...]
    compression: str
    timeout: float
    ca_file: str | None
    cert_file: str | None
    key_file: str | None

    @property
    def connection_key(self) -> tuple[Any, ...]:
        """Routes with the same key share one channel (gRPC) or one connection pool (HTTP)."""
        if self.protocol == "grpc":
            return ("grpc", self.url, self.use_tls, self.ca_file, self.cert_file, self.key_file)
        return ("http", self.ca_file, self.cert_file, self.key_file)


def resolve_route(config: ExporterConfig, signal: Signal, protocol: str | None = None) -> Route:
    """Applies ``signal``'s overrides; for OTLP/HTTP, a per-signal endpoint is used as is and the
    shared one gets the signal's path (``/v1/traces``, …, ``/v1development/profiles``)."""
    own = getattr(config, signal.value)
    c = config.for_signal(signal.value)
    if protocol is not None:
        c = dataclasses.replace(c, protocol=protocol)
    if c.protocol == "grpc":
        url = c.target
    else:
        base = c.effective_endpoint
        if not base.startswith(("http://", "https://")):
            base = ("http://" if c.insecure else "https://") + base
        url = base if own.endpoint is not None else base.rstrip("/") + SPECS[signal].http_path
    return Route(signal, c.protocol, url, c.use_tls if c.protocol == "grpc" else url.startswith("https://"),
                 tuple((k.lower(), v) for k, v in c.headers.items()), c.compression, c.timeout,
                 c.ca_file, c.cert_file, c.key_file)


@dataclass(frozen=True)
class PushResult:
    """A request the server accepted: ``status`` labels the request counter; ``rejected`` items
    (partial success) are counted as dropped."""

    status: str
    rejected: int = 0
    message: str = ""


class Transport(Protocol):
    """A push function with a lifecycle: ``encode`` once per request (the bytes are reused on
    every retry), ``push`` sends once and raises ``ExportError`` on failure."""

    async def start(self) -> None: ...

    def encode(self, route: Route, request: Any) -> bytes: ...

    async def push(self, route: Route, data: bytes, timeout: float) -> PushResult: ...

    async def close(self) -> None: ...
