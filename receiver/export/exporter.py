"""The exporter as the Collector's ``exporterhelper`` composes it: queue → batch → retry/timeout
→ a push function that only encodes and sends. The transports (``otlp_grpc.GrpcTransport``,
``otlp_http.HttpTransport``) are those push functions; everything here is shared by both and
generic over the four signals (see ``signals.SPECS``).

Per signal: a bounded queue counted in items (full → drop and count ``queue_full``), a sender
task that flushes on ``max_batch_size`` items or ``batch_timeout``, requests split so none
exceeds ``max_request_bytes``, each request encoded once and retried per the OTLP spec. Once an
item is submitted it belongs to the exporter: it is sent, or its loss is counted with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from ..config import ExporterConfig
from ..errors import ExportError, PermanentExportError, RetryableExportError
from ..model import Signal
from ..telemetry import SelfTelemetry
from .disk_queue import DiskQueue
from .retry import Backoff
from .signals import SPECS, build_request, count_items, split_request
from .transport import PushResult, Route, Transport, resolve_route

__all__ = ["OtlpExporter", "OtlpGrpcExporter", "OtlpHttpExporter", "PushResult", "Route", "Transport",
           "resolve_route"]

log = logging.getLogger(__name__)


@dataclass
class _Whole:
    """A ready-made request in the queue: sent as it is (split only by size), never merged."""

    request: Any
    count: int


@dataclass
class _SignalQueue:
    """Bounded FIFO for one signal (``(resource, item)`` pairs and whole requests, counted in
    items), and the task that drains it."""

    signal: Signal
    capacity: int
    route: Route
    transport: Any = None
    entries: deque[Any] = field(default_factory=deque)
    queued: int = 0       # items in ``entries``
    in_flight: int = 0    # items taken by the sender and not yet sent or counted
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    disk: DiskQueue | None = None      # with the on-disk queue: batches wait there to be sent
    disk_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    disk_task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self.queued + self.in_flight


def _make_transport(route: Route, config: ExporterConfig) -> Any:
    if route.protocol == "grpc":
        from .otlp_grpc import GrpcTransport

        return GrpcTransport(route, config)
    from .otlp_http import HttpTransport

    return HttpTransport(route, config)


class OtlpExporter:
    """Lifecycle: ``start()`` opens the connections and starts one sender per signal;
    ``submit()``/``submit_request()`` are non-blocking and called from the event loop;
    ``flush()`` sends what is queued; ``shutdown()`` flushes within ``shutdown_timeout``, counts
    what is left, and closes. ``shutdown()`` is safe before ``start()`` and safe twice.

    The protocol is chosen per signal by the config (``exporter.protocol`` and the per-signal
    overrides), or for every signal by ``protocol``."""

    def __init__(self, config: ExporterConfig, telemetry: SelfTelemetry,
                 clock: Callable[[], float] = time.monotonic, protocol: str | None = None):
        self.config = config
        self.telemetry = telemetry
        self._clock = clock
        self._queues = {s: _SignalQueue(s, config.queue_size, resolve_route(config, s, protocol))
                        for s in Signal}
        self._transports: dict[tuple[Any, ...], Any] = {}
        self._request_types = {s: SPECS[s].request for s in Signal}
        self._stopping = asyncio.Event()
        self._deadline: float | None = None  # set during shutdown: no attempt starts after it
        self._started = False
        self._closed = False
        self._flushing = 0  # flush() calls in progress: senders do not wait for fuller batches
        self._last_error_log: dict[str, float] = {}
        for s, q in self._queues.items():
            telemetry.watch_queue(s.value, lambda q=q: q.depth, q.capacity)
            if config.disk_queue_directory:
                q.disk = DiskQueue(Path(config.disk_queue_directory) / s.value,
                                   config.disk_queue_max_bytes)

    def routes(self) -> dict[Signal, Route]:
        return {s: q.route for s, q in self._queues.items()}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        try:
            for q in self._queues.values():
                if q.disk is not None:
                    left = q.disk.open()
                    if left:
                        log.info("disk queue: %d %s items from before the restart are sent first",
                                 left, q.signal.value)
                key = q.route.connection_key
                if key not in self._transports:
                    transport = _make_transport(q.route, self.config)
                    await transport.start()
                    self._transports[key] = transport
                q.transport = self._transports[key]
        except BaseException:
            await self._close_transports()
            raise
        loop = asyncio.get_running_loop()
        for q in self._queues.values():
            q.task = loop.create_task(self._run_sender(q), name=f"otlp-sender-{q.signal.value}")
            if q.disk is not None:
                q.disk_task = loop.create_task(self._run_disk_sender(q),
                                               name=f"otlp-disk-sender-{q.signal.value}")
        self._started = True
        for route in {(q.route.protocol, q.route.url.rsplit("/v1", 1)[0], q.route.use_tls,
                       q.route.compression) for q in self._queues.values()}:
            log.info("exporting OTLP %s to %s (%s, compression %s)", route[0], route[1],
                     "TLS" if route[2] else "plaintext", route[3])

    def submit(self, signal: Signal, resource: Resource | None, item: Any) -> bool:
        """Queues one span/metric/log record/profile. Returns False when the item was dropped
        (queue full or exporter closed), which is counted. An item that is itself a whole
        ``Export*ServiceRequest`` of the signal is queued as ``submit_request`` does."""
        if isinstance(item, self._request_types[signal]):
            return self.submit_request(signal, item)
        q = self._queues[signal]
        if self._closed:
            self.telemetry.dropped_items.labels(signal.value, "shutdown").inc()
            return False
        if q.depth >= q.capacity and not self._make_room_on_disk(q):  # a batch being sent still holds its slots
            self.telemetry.dropped_items.labels(signal.value, "queue_full").inc()
            return False
        q.entries.append((resource, item))
        q.queued += 1
        if q.queued == 1 or q.queued >= self.config.max_batch_size:
            q.wakeup.set()   # the first item starts the batch timer; a full batch goes now
        return True

    def submit_request(self, signal: Signal, request: Any) -> bool:
        """Queues a ready-made ``Export*ServiceRequest`` of ``signal``; it takes as many queue
        slots as it has items and is sent as it is (split only when over
        ``max_request_bytes``), never merged with others. Returns False when dropped (counted)."""
        q = self._queues[signal]
        n = count_items(signal, request)
        if self._closed:
            self.telemetry.dropped_items.labels(signal.value, "shutdown").inc(n)
            return False
        if q.depth + max(n, 1) > q.capacity and not (max(n, 1) <= q.capacity
                                                      and self._make_room_on_disk(q)):
            self.telemetry.dropped_items.labels(signal.value, "queue_full").inc(n)
            return False
        q.entries.append(_Whole(request, n))
        q.queued += max(n, 1)
        q.wakeup.set()
        return True

    async def flush(self) -> None:
        """Returns once everything queued before the call has been sent or counted as lost."""
        self._flushing += 1
        try:
            for q in self._queues.values():
                q.wakeup.set()
            while self._started and any(q.depth or (q.disk and q.disk.items)
                                        for q in self._queues.values()):
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
            tasks = [t for q in self._queues.values() for t in (q.task, q.disk_task) if t]
            _done, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_timeout + 1)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        lost = {}
        for q in self._queues.values():
            if q.disk is not None and q.entries:
                self._spill_to_disk(q)  # what is on disk is sent after the next start
            left = sum(e.count if isinstance(e, _Whole) else 1 for e in q.entries) + q.in_flight
            if left:
                self.telemetry.dropped_items.labels(q.signal.value, "shutdown").inc(left)
                lost[q.signal.value] = left
            q.entries.clear()
            q.queued = q.in_flight = 0
        if lost:
            log.warning("shutdown: could not send within %.1fs: %s", self.config.shutdown_timeout,
                        ", ".join(f"{n} {s}" for s, n in lost.items()))
        await self._close_transports()

    def _make_room_on_disk(self, q: _SignalQueue) -> bool:
        """With the on-disk queue, a full memory queue is written to disk (oldest first, as its
        sender would, bounded by ``disk_queue_max_bytes``: past it counted ``disk_full``) rather
        than the next item dropped. The memory queue only stages batches for the disk, and a
        burst larger than it (a source draining a ring buffer the agent had no CPU to read for a
        while: nothing yields to the sender meanwhile) must not be lost while the disk has room.
        True when the memory queue is empty now."""
        if q.disk is None or q.in_flight:   # in_flight: only ever 0 here with a disk queue
            return False
        self._spill_to_disk(q)
        q.disk_wakeup.set()
        return True

    def _spill_to_disk(self, q: _SignalQueue) -> None:
        while q.entries:
            request, count, slots = self._take_batch(q)
            q.queued -= slots
            q.in_flight = count
            self._to_disk(q, request)
        q.in_flight = 0

    async def _close_transports(self) -> None:
        transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            try:
                await t.close()
            except Exception:
                log.exception("error closing an export connection")

    # ------------------------------------------------------------------ batching

    def _take_batch(self, q: _SignalQueue) -> tuple[Any, int, int]:
        """The next request to send, its item count and the queue slots it frees: a whole
        request as it is, else up to ``max_batch_size`` consecutive items."""
        head = q.entries[0]
        if isinstance(head, _Whole):
            q.entries.popleft()
            return head.request, head.count, max(head.count, 1)
        batch = []
        limit = self.config.max_batch_size
        entries = q.entries
        while entries and len(batch) < limit and not isinstance(entries[0], _Whole):
            batch.append(entries.popleft())
        return build_request(q.signal, batch), len(batch), len(batch)

    async def _wait(self, event: asyncio.Event) -> None:
        """Until ``event`` is set (more items, a flush, a shutdown) or ``batch_timeout`` passes."""
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), self.config.batch_timeout)
        except TimeoutError:
            pass

    async def _run_sender(self, q: _SignalQueue) -> None:
        while True:
            if not q.entries:
                if self._stopping.is_set():
                    return
                # Nothing queued: sleep until an item, a flush or the shutdown wakes us (a timed
                # wait here woke the event loop every batch_timeout per signal on an idle host).
                q.wakeup.clear()
                await q.wakeup.wait()
                continue
            if (q.queued < self.config.max_batch_size and not self._stopping.is_set()
                    and not self._flushing and not isinstance(q.entries[0], _Whole)):
                # First item of a batch: wait for more until the batch is full or times out.
                await self._wait(q.wakeup)
            request, count, slots = self._take_batch(q)
            q.queued -= slots
            q.in_flight = count
            try:
                await self._send_request(q, request)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch kill the sender
                log.exception("unexpected error exporting %s", q.signal.value)
                self.telemetry.dropped_items.labels(q.signal.value, "internal_error").inc(q.in_flight)
            finally:
                q.in_flight = 0

    async def _send_request(self, q: _SignalQueue, request: Any) -> None:
        signal = q.signal
        limit = self.config.max_request_bytes
        for part in split_request(signal, request, limit):
            count = count_items(signal, part)
            size = part.ByteSize()  # the limit applies to the protobuf encoding
            if size > limit:
                self.telemetry.dropped_items.labels(signal.value, "too_large").inc(count)
                self._log_rate_limited("too_large", "dropped %d %s items in a request of %d bytes: "
                                       "over max_request_bytes %d", count, signal.value, size, limit)
            elif q.disk is not None:
                self._to_disk(q, part)
                q.disk_wakeup.set()
                continue
            else:
                await self._send_with_retry(q, q.transport.encode(q.route, part), count)
            q.in_flight -= count

    def _to_disk(self, q: _SignalQueue, request: Any) -> None:
        """Into the on-disk queue (split to size first); past its bound, counted ``disk_full``."""
        assert q.disk is not None
        for part in split_request(q.signal, request, self.config.max_request_bytes):
            count = count_items(q.signal, part)
            try:
                stored = q.disk.put(part.SerializeToString(), count)
            except OSError as e:
                stored = False
                self._log_rate_limited("disk_error", "disk queue: cannot write: %s", e)
            if not stored:
                self.telemetry.dropped_items.labels(q.signal.value, "disk_full").inc(count)
                self._log_rate_limited("disk_full", "disk queue full (%d bytes): dropped %d %s items",
                                       q.disk.bytes, count, q.signal.value)
            q.in_flight -= count

    async def _run_disk_sender(self, q: _SignalQueue) -> None:
        """Sends the oldest request on disk and removes it once sent or counted; one cut off by
        the shutdown deadline stays on disk for the next start."""
        assert q.disk is not None
        request_type = SPECS[q.signal].request
        while True:
            head = q.disk.peek()
            if head is None:
                if self._stopping.is_set() and (q.task is None or q.task.done()):
                    return
                await self._wait(q.disk_wakeup)
                continue
            path, count = head
            try:
                request = request_type.FromString(path.read_bytes())
            except Exception:  # an unreadable file must not stop the queue
                log.exception("disk queue: dropping unreadable %s", path)
                self.telemetry.dropped_items.labels(q.signal.value, "internal_error").inc(count)
                q.disk.remove_oldest()
                continue
            if not await self._send_with_retry(q, q.transport.encode(q.route, request), count,
                                               keep_on_shutdown=True):
                return  # shutting down: the file stays
            q.disk.remove_oldest()

    # ------------------------------------------------------------------ retry and timeout

    async def _send_with_retry(self, q: _SignalQueue, data: bytes, count: int,
                               keep_on_shutdown: bool = False) -> bool:
        """Sends until accepted or the loss is counted (True); with ``keep_on_shutdown``, a
        request cut off by the shutdown deadline is neither sent nor counted (False)."""
        retry = self.config.retry
        started = self._clock()
        delays = Backoff(retry).delays()
        label = q.signal.value
        while True:
            timeout = q.route.timeout
            if self._deadline is not None:
                timeout = min(timeout, max(0.05, self._deadline - self._clock()))
            t0 = time.perf_counter()
            error: ExportError
            try:
                result = await q.transport.push(q.route, data, timeout)
            except ExportError as e:
                error = e
            else:
                self.telemetry.export_latency.labels(label).observe(time.perf_counter() - t0)
                self.telemetry.export_requests.labels(label, result.status).inc()
                rejected = min(result.rejected, count)
                if rejected:
                    self.telemetry.dropped_items.labels(label, "rejected").inc(rejected)
                    self._log_rate_limited("partial", "the Collector rejected %d of %d %s items: %s",
                                           rejected, count, label, result.message)
                elif result.message:
                    self._log_rate_limited("partial", "the Collector warns: %s", result.message)
                self.telemetry.exported_items.labels(label).inc(count - rejected)
                return True
            self.telemetry.export_latency.labels(label).observe(time.perf_counter() - t0)
            self.telemetry.export_requests.labels(label, error.code).inc()
            if isinstance(error, PermanentExportError) or not retry.enabled:
                reason = "permanent_error" if isinstance(error, PermanentExportError) else "retries_exhausted"
                self.telemetry.dropped_items.labels(label, reason).inc(count)
                self._log_rate_limited(reason, "dropped %d %s items: %s: %s", count, label,
                                       error.code, error)
                return True
            assert isinstance(error, RetryableExportError)
            delay = error.retry_after if error.retry_after is not None else next(delays)
            now = self._clock()
            limit = started + retry.max_elapsed_time
            if self._deadline is not None:
                limit = min(limit, self._deadline)
            if now + delay > limit:
                if self._deadline is not None and now + delay > self._deadline:
                    # Cut off by the shutdown deadline, not by max_elapsed_time.
                    if keep_on_shutdown:
                        return False
                    self.telemetry.dropped_items.labels(label, "shutdown").inc(count)
                    self._log_rate_limited("shutdown", "shutdown: dropped %d %s items still being "
                                           "retried (%s: %s)", count, label, error.code, error)
                    return True
                self.telemetry.dropped_items.labels(label, "retries_exhausted").inc(count)
                self._log_rate_limited("retries_exhausted",
                                       "dropped %d %s items after retrying for %.0fs: %s: %s",
                                       count, label, now - started, error.code, error)
                return True
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


class OtlpGrpcExporter(OtlpExporter):
    """The exporter speaking OTLP/gRPC for every signal, whatever ``exporter.protocol`` says."""

    def __init__(self, config: ExporterConfig, telemetry: SelfTelemetry, **kw: Any):
        super().__init__(config, telemetry, protocol="grpc", **kw)


class OtlpHttpExporter(OtlpExporter):
    """The exporter speaking OTLP/HTTP for every signal (``http/protobuf`` unless the config
    says ``http/json``)."""

    def __init__(self, config: ExporterConfig, telemetry: SelfTelemetry, **kw: Any):
        protocol = config.protocol if config.protocol.startswith("http/") else "http/protobuf"
        super().__init__(config, telemetry, protocol=protocol, **kw)
