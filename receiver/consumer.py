"""The two small interfaces between stages, as the Collector's ``consumer`` package: a source
hands its output to a ``Consumer``; the pipeline submits converted items to a ``Sink``. Once
handed over, data belongs to the next stage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    from .model import Signal
    from .profiling.model import CpuProfile
    from .records import MetricSnapshot, Record

__all__ = ["Consumer", "Sink"]


class Consumer(Protocol):
    """What a source hands its output to (the pipeline in the agent, a recorder in tests)."""

    def consume_event(self, record: Record) -> None: ...

    def consume_metrics(self, snapshot: MetricSnapshot) -> None: ...

    def consume_profile(self, profile: CpuProfile) -> None: ...


class Sink(Protocol):
    """Where converted items go: the exporter's queue. ``submit`` never blocks; it returns
    False when the item was dropped (and counted) instead."""

    def submit(self, signal: Signal, resource: Resource | None, item: Any) -> bool: ...

    def submit_request(self, signal: Signal, request: Any) -> bool:
        """A ready-made ``Export*ServiceRequest`` (profiles carry their own dictionary), split by
        the sink when over its size limit."""
        ...
