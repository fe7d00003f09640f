"""OTLP/gRPC exporter for all four signals over one ``grpc.aio`` channel.

Per signal: a bounded queue (full → drop and count ``queue_full``), a sender task that flushes on
``max_batch_size`` items or ``batch_timeout``, requests split so none exceeds
``max_request_bytes``, each request encoded once and retried per the OTLP spec. Once an item is
submitted it belongs to the exporter: it is sent, or its loss is counted with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_svc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_svc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as profiles_svc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_svc
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .._version import __version__
from ..config import ExporterConfig
from ..errors import ExportError, PermanentExportError, RetryableExportError
from ..model import Signal
from ..telemetry import SelfTelemetry
from .retry import Backoff, classify_rpc_error

__all__ = ["OtlpGrpcExporter", "SCOPE"]

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope(name="ebpf-otlp-receiver", version=__version__)


@dataclass(frozen=True)
class _SignalSpec:
    method: str
    request: Any
    response: Any
    resource_field: str   # ExportXRequest.<resource_field> → ResourceX
    scope_field: str      # ResourceX.<scope_field> → ScopeX
    items_field: str      # ScopeX.<items_field> → items
    rejected_field: str   # partial_success.<rejected_field>


_SPECS = {
    Signal.TRACES: _SignalSpec("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                               trace_svc.ExportTraceServiceRequest, trace_svc.ExportTraceServiceResponse,
                               "resource_spans", "scope_spans", "spans", "rejected_spans"),
    Signal.METRICS: _SignalSpec("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                                metrics_svc.ExportMetricsServiceRequest,
                                metrics_svc.ExportMetricsServiceResponse,
                                "resource_metrics", "scope_metrics", "metrics", "rejected_data_points"),
    Signal.LOGS: _SignalSpec("/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                             logs_svc.ExportLogsServiceRequest, logs_svc.ExportLogsServiceResponse,
                             "resource_logs", "scope_logs", "log_records", "rejected_log_records"),
    Signal.PROFILES: _SignalSpec(
        "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export",
        profiles_svc.ExportProfilesServiceRequest, profiles_svc.ExportProfilesServiceResponse,
        "resource_profiles", "scope_profiles", "profiles", "rejected_profiles"),
}


def _count_items(signal: Signal, request: Any) -> int:
    """Items in a ready-made request (profiles come as whole requests): what partial success counts."""
    spec = _SPECS[signal]
    return sum(len(getattr(s, spec.items_field))
               for r in getattr(request, spec.resource_field) for s in getattr(r, spec.scope_field))


class _SignalQueue:
    """Bounded FIFO of ``(resource, item)`` for one signal, and the task that drains it."""

    def __init__(self, signal: Signal, capacity: int):
        self.signal = signal
        self.capacity = capacity
        self.items: deque[tuple[Resource | None, Any]] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.in_flight = 0


class OtlpGrpcExporter:
    """Lifecycle: ``start()`` opens the channel and starts one sender per signal; ``submit()`` is
    non-blocking and called from the event loop; ``flush()`` sends what is queued;
    ``shutdown()`` flushes within ``shutdown_timeout``, counts what is left, and closes.
    ``shutdown()`` is safe before ``start()`` and safe twice."""

    def __init__(self, config: ExporterConfig, telemetry: SelfTelemetry,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.telemetry = telemetry
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[Signal, Any] = {}
        self._queues = {s: _SignalQueue(s, config.queue_size) for s in Signal}
        self._stopping = asyncio.Event()
        self._deadline: float | None = None  # set during shutdown: no attempt starts after it
        self._started = False
        self._closed = False
        self._flushing = 0  # flush() calls in progress: senders do not wait for fuller batches
        self._last_error_log: dict[str, float] = {}
        for s, q in self._queues.items():
            telemetry.watch_queue(s.value, lambda q=q: len(q.items) + q.in_flight, q.capacity)

    # ------------------------------------------------------------------ lifecycle

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(root_certificates=read(self.config.ca_file),
                                            private_key=read(self.config.key_file),
                                            certificate_chain=read(self.config.cert_file))

    async def start(self) -> None:
        if self._started:
            return
        options = [("grpc.max_send_message_length", self.config.max_request_bytes + 1024 * 1024),
                   ("grpc.keepalive_time_ms", 30000)]
        if self.config.use_tls:
            self._channel = grpc.aio.secure_channel(self.config.target, self._credentials(), options)
        else:
            self._channel = grpc.aio.insecure_channel(self.config.target, options)
        for s, spec in _SPECS.items():
            # Requests go in already serialized: encoded once, reused on every retry.
            self._calls[s] = self._channel.unary_unary(spec.method, request_serializer=None,
                                                       response_deserializer=spec.response.FromString)
        loop = asyncio.get_running_loop()
        for q in self._queues.values():
            q.task = loop.create_task(self._run_sender(q), name=f"otlp-sender-{q.signal.value}")
        self._started = True
        log.info("exporting OTLP/gRPC to %s (%s, compression %s)", self.config.target,
                 "TLS" if self.config.use_tls else "plaintext", self.config.compression)

    def submit(self, signal: Signal, resource: Resource | None, item: Any) -> bool:
        """Queues one span/metric/log record (or, for profiles, one whole request).
        Returns False when the item was dropped (queue full or exporter closed), which is counted."""
        q = self._queues[signal]
        if self._closed:
            self.telemetry.dropped_items.labels(signal.value, "shutdown").inc()
            return False
        if len(q.items) + q.in_flight >= q.capacity:  # a batch being sent still holds its slots
            self.telemetry.dropped_items.labels(signal.value, "queue_full").inc()
            return False
        q.items.append((resource, item))
        if len(q.items) >= self.config.max_batch_size:
            q.wakeup.set()
        return True

    async def flush(self) -> None:
        """Returns once everything queued before the call has been sent or counted as lost."""
        self._flushing += 1
        try:
            for q in self._queues.values():
                q.wakeup.set()
            while any(q.items or q.in_flight for q in self._queues.values()) and self._started:
                await asyncio.sleep(0.01)
        finally:
            self._flushing -= 1

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._deadline = self._clock() + self.config.shutdown_timeout
            self._stopping.set()
            for q in self._queues.values():
                q.wakeup.set()
            tasks = [q.task for q in self._queues.values() if q.task]
            done, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_timeout + 1)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        lost = {}
        for q in self._queues.values():
            left = len(q.items) + q.in_flight
            if left:
                self.telemetry.dropped_items.labels(q.signal.value, "shutdown").inc(left)
                lost[q.signal.value] = left
            q.items.clear()
        if lost:
            log.warning("shutdown: could not send within %.1fs: %s", self.config.shutdown_timeout,
                        ", ".join(f"{n} {s}" for s, n in lost.items()))
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # ------------------------------------------------------------------ sending

    async def _run_sender(self, q: _SignalQueue) -> None:
        while True:
            if not q.items:
                if self._stopping.is_set():
                    return
                q.wakeup.clear()
                try:
                    await asyncio.wait_for(q.wakeup.wait(), self.config.batch_timeout)
                except TimeoutError:
                    pass
                continue
            if (len(q.items) < self.config.max_batch_size and not self._stopping.is_set()
                    and not self._flushing):
                # First item of a batch: wait for more until the batch is full or times out.
                q.wakeup.clear()
                try:
                    await asyncio.wait_for(q.wakeup.wait(), self.config.batch_timeout)
                except TimeoutError:
                    pass
            n = min(len(q.items), self.config.max_batch_size)
            batch = [q.items.popleft() for _ in range(n)]
            q.in_flight = n
            try:
                await self._send_batch(q.signal, batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch kill the sender
                log.exception("unexpected error exporting %s", q.signal.value)
                self.telemetry.dropped_items.labels(q.signal.value, "internal_error").inc(n)
            finally:
                q.in_flight = 0

    def _build_request(self, signal: Signal, batch: Sequence[tuple[Resource | None, Any]]) -> Any:
        spec = _SPECS[signal]
        req = spec.request()
        if signal is Signal.PROFILES:
            # Each profiles item is a whole request with its own dictionary; never merged.
            for _, item in batch:
                req.MergeFrom(item)
            return req
        groups: dict[int, Any] = {}
        resources = getattr(req, spec.resource_field)
        for resource, item in batch:
            key = id(resource)
            scope_items = groups.get(key)
            if scope_items is None:
                rx = resources.add()
                if resource is not None:
                    rx.resource.CopyFrom(resource)
                sx = getattr(rx, spec.scope_field).add()
                sx.scope.CopyFrom(SCOPE)
                scope_items = groups[key] = getattr(sx, spec.items_field)
            scope_items.append(item)
        return req

    async def _send_batch(self, signal: Signal, batch: list[tuple[Resource | None, Any]]) -> None:
        if signal is Signal.PROFILES and len(batch) > 1:
            for one in batch:  # profiles requests each carry a dictionary: send separately
                await self._send_batch(signal, [one])
            return
        req = self._build_request(signal, batch)
        data = req.SerializeToString()
        if len(data) > self.config.max_request_bytes:
            if len(batch) == 1:
                self.telemetry.dropped_items.labels(signal.value, "too_large").inc(
                    _count_items(signal, req) if signal is Signal.PROFILES else 1)
                self._log_rate_limited("too_large", "dropped one %s item of %d bytes: over max_request_bytes %d",
                                       signal.value, len(data), self.config.max_request_bytes)
                return
            half = len(batch) // 2
            await self._send_batch(signal, batch[:half])
            await self._send_batch(signal, batch[half:])
            return
        count = _count_items(signal, req) if signal is Signal.PROFILES else len(batch)
        await self._send_with_retry(signal, data, count)

    async def _send_with_retry(self, signal: Signal, data: bytes, count: int) -> None:
        retry = self.config.retry
        started = self._clock()
        delays = Backoff(retry).delays()
        label = signal.value
        compression = grpc.Compression.Gzip if self.config.compression == "gzip" else grpc.Compression.NoCompression
        metadata = tuple((k.lower(), v) for k, v in self.config.headers.items())
        while True:
            timeout = self.config.timeout
            if self._deadline is not None:
                timeout = min(timeout, max(0.05, self._deadline - self._clock()))
            t0 = time.perf_counter()
            error: ExportError
            try:
                response = await self._calls[signal](data, timeout=timeout, metadata=metadata,
                                                     compression=compression)
            except grpc.RpcError as e:
                error = classify_rpc_error(e)
            else:
                self.telemetry.export_latency.labels(label).observe(time.perf_counter() - t0)
                self.telemetry.export_requests.labels(label, "OK").inc()
                rejected = getattr(response.partial_success, _SPECS[signal].rejected_field, 0) \
                    if response.HasField("partial_success") else 0
                if rejected:
                    self.telemetry.dropped_items.labels(label, "rejected").inc(rejected)
                    self._log_rate_limited("partial", "the Collector rejected %d of %d %s items: %s",
                                           rejected, count, label, response.partial_success.error_message)
                elif response.HasField("partial_success") and response.partial_success.error_message:
                    self._log_rate_limited("partial", "the Collector warns: %s",
                                           response.partial_success.error_message)
                self.telemetry.exported_items.labels(label).inc(count - rejected)
                return
            self.telemetry.export_latency.labels(label).observe(time.perf_counter() - t0)
            self.telemetry.export_requests.labels(label, error.code).inc()
            if isinstance(error, PermanentExportError) or not retry.enabled:
                reason = "permanent_error" if isinstance(error, PermanentExportError) else "retries_exhausted"
                self.telemetry.dropped_items.labels(label, reason).inc(count)
                self._log_rate_limited(reason, "dropped %d %s items: %s: %s", count, label,
                                       error.code, error)
                return
            assert isinstance(error, RetryableExportError)
            delay = error.retry_after if error.retry_after is not None else next(delays)
            now = self._clock()
            limit = started + retry.max_elapsed_time
            if self._deadline is not None:
                limit = min(limit, self._deadline)
            if now + delay > limit:
                if self._deadline is not None and now + delay > self._deadline:
                    # Cut off by the shutdown deadline, not by max_elapsed_time.
                    self.telemetry.dropped_items.labels(label, "shutdown").inc(count)
                    self._log_rate_limited("shutdown", "shutdown: dropped %d %s items still being "
                                           "retried (%s: %s)", count, label, error.code, error)
                    return
                self.telemetry.dropped_items.labels(label, "retries_exhausted").inc(count)
                self._log_rate_limited("retries_exhausted",
                                       "dropped %d %s items after retrying for %.0fs: %s: %s",
                                       count, label, now - started, error.code, error)
                return
            self.telemetry.export_retries.labels(label).inc()
            self._log_rate_limited("retry", "export of %s failed (%s: %s); retrying in %.1fs",
                                   label, error.code, error, delay)
            if self._deadline is None:
                try:  # a shutdown ends the wait early; the next attempt then honours the deadline
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(delay)

    def _log_rate_limited(self, key: str, msg: str, *args: Any, every: float = 10.0) -> None:
        now = self._clock()
        if now - self._last_error_log.get(key, -every) >= every:
            self._last_error_log[key] = now
            log.warning(msg, *args)
