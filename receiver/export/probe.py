"""``check``'s look at the export endpoints: an empty export request (which a Collector accepts
and which carries no data) in the configured protocol, and when that fails without a
connection error, the same in the other protocol, so that gRPC spoken to an OTLP/HTTP port, or
HTTP to a gRPC port, is named with its fix instead of surfacing later as "Failed parsing HTTP/2"
or a reset connection. Blocking sockets: ``check`` runs outside the event loop."""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from dataclasses import dataclass

import grpc

from ..config import ExporterConfig
from .signals import SPECS
from .transport import Route, resolve_route

__all__ = ["EndpointProbe", "probe_endpoints"]


@dataclass(frozen=True)
class EndpointProbe:
    requirement: str
    ok: bool
    detail: str
    fix: str = ""
    blocking: bool = False   # a confirmed protocol mismatch: nothing would be delivered


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _grpc(route: Route, target: str, timeout: float) -> tuple[bool, bool, str]:
    """(answered as OTLP/gRPC, could connect at all, detail)."""
    if route.use_tls:
        creds = grpc.ssl_channel_credentials(_read(route.ca_file), _read(route.key_file),
                                             _read(route.cert_file))
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    try:
        call = channel.unary_unary(SPECS[route.signal].grpc_method, request_serializer=None,
                                   response_deserializer=None)
        call(b"", timeout=timeout, metadata=route.headers)
        return True, True, "OTLP/gRPC answers"
    except grpc.RpcError as e:
        details = e.details() if hasattr(e, "details") else str(e)
        refused = (e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                   or "failed to connect to remote host" in (details or "").lower())
        return False, not refused, f"{e.code().name}: {details}"
    finally:
        channel.close()


def _http(route: Route, url: str, timeout: float) -> tuple[bool, bool, str]:
    """(answered as OTLP/HTTP, could connect at all, detail)."""
    u = urllib.parse.urlsplit(url)
    try:
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=route.ca_file)
            if route.cert_file and route.key_file:
                ctx.load_cert_chain(route.cert_file, route.key_file)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                u.hostname or "", u.port or 443, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
        try:
            conn.request("POST", u.path or "/", body=b"",
                         headers={"Content-Type": "application/x-protobuf", **dict(route.headers)})
            status = conn.getresponse().status
        finally:
            conn.close()
    except (ConnectionRefusedError, TimeoutError, OSError) as e:
        if isinstance(e, (ConnectionResetError, ConnectionAbortedError, ssl.SSLError)):
            return False, True, f"{type(e).__name__}: {e}"
        return False, False, f"{type(e).__name__}: {e}"
    except http.client.HTTPException as e:  # e.g. the server closed without an HTTP answer
        return False, True, f"{type(e).__name__}: {e}"
    if 200 <= status < 300:
        return True, True, f"OTLP/HTTP answers (HTTP {status})"
    return False, True, f"HTTP {status} from {url}"


def probe_endpoints(config: ExporterConfig, timeout: float = 2.0) -> list[EndpointProbe]:
    """One row per distinct (protocol, endpoint) the signals are sent to."""
    out: list[EndpointProbe] = []
    seen: set[tuple[str, str]] = set()
    for signal in SPECS:
        route = resolve_route(config, signal)
        host = route.url if route.protocol == "grpc" else urllib.parse.urlsplit(route.url).netloc
        if (route.protocol, host) not in seen:
            seen.add((route.protocol, host))
            out.append(_probe(route, host, timeout))
    return out


def _probe(route: Route, host: str, timeout: float) -> EndpointProbe:
    if route.protocol == "grpc":
        name = f"exporter endpoint {host} (OTLP/gRPC)"
        ok, connected, detail = _grpc(route, host, timeout)
        scheme = "https" if route.use_tls else "http"
        fix = ("this port speaks OTLP/HTTP: set exporter.protocol: http/protobuf "
               "(OTEL_EXPORTER_OTLP_PROTOCOL), or use the Collector's gRPC port (4317)")
    else:
        name = f"exporter endpoint {route.url} (OTLP/HTTP)"
        ok, connected, detail = _http(route, route.url, timeout)
        fix = ("this port speaks OTLP/gRPC: set exporter.protocol: grpc "
               "(OTEL_EXPORTER_OTLP_PROTOCOL), or use the Collector's HTTP port (4318)")
    if ok:
        return EndpointProbe(name, True, detail)
    if route.protocol == "grpc":
        other_ok = _http(route, f"{scheme}://{host}{SPECS[route.signal].http_path}", timeout)[0]
    else:
        other_ok = _grpc(route, host, timeout)[0]
    if other_ok:
        return EndpointProbe(name, False, f"protocol mismatch ({detail})", fix, blocking=True)
    if not connected:
        return EndpointProbe(name, False, f"not reachable now ({detail})",
                             "start the Collector, or point exporter.endpoint at it")
    return EndpointProbe(name, False, f"answers, but not as OTLP expects ({detail})",
                         "check exporter.endpoint, its path and TLS settings")
