"""What the exporter knows of the four OTLP signals, as one table: request and response types,
the field path ``request → resource groups → scope groups → items``, the partial-success
counter, the gRPC method and the OTLP/HTTP path. Everything else in the exporter is generic over
this table: counting items, building a request from items, and splitting a request by size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_svc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_svc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2 as profiles_svc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_svc
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .._version import __version__
from ..model import Signal

__all__ = ["SCOPE", "SPECS", "SignalSpec", "build_request", "count_items", "split_request"]

SCOPE = InstrumentationScope(name="ebpf-otlp-receiver", version=__version__)


@dataclass(frozen=True)
class SignalSpec:
    grpc_method: str
    http_path: str        # appended to a base endpoint (a per-signal endpoint is used as is)
    request: Any
    response: Any
    resource_field: str   # ExportXRequest.<resource_field> → ResourceX
    scope_field: str      # ResourceX.<scope_field> → ScopeX
    items_field: str      # ScopeX.<items_field> → items
    rejected_field: str   # partial_success.<rejected_field>


SPECS = {
    Signal.TRACES: SignalSpec(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export", "/v1/traces",
        trace_svc.ExportTraceServiceRequest, trace_svc.ExportTraceServiceResponse,
        "resource_spans", "scope_spans", "spans", "rejected_spans"),
    Signal.METRICS: SignalSpec(
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", "/v1/metrics",
        metrics_svc.ExportMetricsServiceRequest, metrics_svc.ExportMetricsServiceResponse,
        "resource_metrics", "scope_metrics", "metrics", "rejected_data_points"),
    Signal.LOGS: SignalSpec(
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export", "/v1/logs",
        logs_svc.ExportLogsServiceRequest, logs_svc.ExportLogsServiceResponse,
        "resource_logs", "scope_logs", "log_records", "rejected_log_records"),
    Signal.PROFILES: SignalSpec(
        "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export",
        "/v1development/profiles",
        profiles_svc.ExportProfilesServiceRequest, profiles_svc.ExportProfilesServiceResponse,
        "resource_profiles", "scope_profiles", "profiles", "rejected_profiles"),
}


def count_items(signal: Signal, request: Any) -> int:
    """Items in a request: what queue bounds, self-metrics and partial success count."""
    spec = SPECS[signal]
    return sum(len(getattr(s, spec.items_field))
               for r in getattr(request, spec.resource_field) for s in getattr(r, spec.scope_field))


def build_request(signal: Signal, batch: Sequence[tuple[Resource | None, Any]]) -> Any:
    """One request from ``(resource, item)`` pairs: one resource group per distinct resource
    object (sources hand the same object for the same process), one scope, items in order."""
    spec = SPECS[signal]
    req = spec.request()
    groups: dict[int, Any] = {}
    resources = getattr(req, spec.resource_field)
    for resource, item in batch:
        scope_items = groups.get(id(resource))
        if scope_items is None:
            rx = resources.add()
            if resource is not None:
                rx.resource.CopyFrom(resource)
            sx = getattr(rx, spec.scope_field).add()
            sx.scope.CopyFrom(SCOPE)
            scope_items = groups[id(resource)] = getattr(sx, spec.items_field)
        scope_items.append(item)
    return req


def _shell(request: Any, spec: SignalSpec) -> Any:
    """The request without its resource groups: what every part must carry (for profiles, the
    request's dictionary, which the items index into)."""
    shell = type(request)()
    shell.CopyFrom(request)
    shell.ClearField(spec.resource_field)
    return shell


def split_request(signal: Signal, request: Any, max_bytes: int) -> list[Any]:
    """Parts of ``request`` each at most ``max_bytes`` encoded, splitting by resource groups,
    then scope groups, then items, in halves. Every field beside the resource groups (the
    profiles dictionary) is copied into each part. A part that cannot get under the limit (a
    single item, or a shell already too large) is returned as it is: the caller counts it
    ``too_large``. The order of items is kept."""
    if request.ByteSize() <= max_bytes:
        return [request]
    spec = SPECS[signal]
    shell = _shell(request, spec)
    if shell.ByteSize() >= max_bytes:
        return [request]
    out: list[Any] = []
    _split(request, spec, shell, max_bytes, out)
    return out


def _part(shell: Any, spec: SignalSpec, groups: Sequence[Any]) -> Any:
    part = type(shell)()
    part.CopyFrom(shell)
    getattr(part, spec.resource_field).extend(groups)
    return part


def _split(request: Any, spec: SignalSpec, shell: Any, max_bytes: int, out: list[Any]) -> None:
    if request.ByteSize() <= max_bytes:
        out.append(request)
        return
    groups = getattr(request, spec.resource_field)
    if len(groups) > 1:
        half = len(groups) // 2
        for chunk in (groups[:half], groups[half:]):
            _split(_part(shell, spec, chunk), spec, shell, max_bytes, out)
        return
    if not groups:
        out.append(request)
        return
    group = groups[0]
    scopes = getattr(group, spec.scope_field)
    if len(scopes) > 1:
        half = len(scopes) // 2
        for chunk in (scopes[:half], scopes[half:]):
            g = type(group)()
            g.CopyFrom(group)
            g.ClearField(spec.scope_field)
            getattr(g, spec.scope_field).extend(chunk)
            _split(_part(shell, spec, [g]), spec, shell, max_bytes, out)
        return
    items = getattr(scopes[0], spec.items_field) if scopes else []
    if len(items) < 2:
        out.append(request)          # one item over the limit: the caller counts it
        return
    half = len(items) // 2
    for chunk in (items[:half], items[half:]):
        g = type(group)()
        g.CopyFrom(group)
        sx = getattr(g, spec.scope_field)[0]
        sx.ClearField(spec.items_field)
        getattr(sx, spec.items_field).extend(chunk)
        _split(_part(shell, spec, [g]), spec, shell, max_bytes, out)
