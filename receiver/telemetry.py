"""The agent's own health: Prometheus self-metrics on ``/metrics``, plus ``/healthz`` and ``/readyz``.

Our own ``CollectorRegistry`` (never the global one), so tests and embedders build fresh ones.
Every loss anywhere in the pipeline is a counter here, labelled by where it happened.
Queue depths are read at scrape time through callbacks.
"""

from __future__ import annotations

import logging
import platform
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ._version import __version__
from .errors import ReceiverError
from .web_config import WebConfig

__all__ = ["SelfTelemetry", "TelemetryServer", "ExportHealth", "DROP_REASONS", "CACHES"]

log = logging.getLogger(__name__)
NS = "ebpf_receiver"

SIGNALS = ("traces", "metrics", "logs", "profiles")
# Every reason the exporter drops items for: each gets a 0 series from start, so an alert on
# rate(...) sees 0 rather than nothing.
DROP_REASONS = ("queue_full", "permanent_error", "retries_exhausted", "rejected", "shutdown",
                "too_large", "internal_error", "disk_full")
# Every user-space cache that grows with the host: the `cache` label's only values (README, "Caches").
CACHES = ("process_resources", "cgroups", "process_pids", "symbol_files", "symbol_processes",
          "symbol_frames", "demangled_names", "profile_stacks", "unwind_processes",
          "python_codes", "python_frames", "network_series", "network_open_connections",
          "http_connections", "http_series")
# gRPC codes that say something about one request's data, not whether the Collector is reachable.
# Outcomes that say "this data", not "export is broken": gRPC status names, and OTLP/HTTP's
# 400 (bad data) and 413 (too large).
_DATA_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                         "ALREADY_EXISTS", "NOT_FOUND", "400", "413"})


def _succeeded(status: str) -> bool:
    """gRPC ``OK``, or an HTTP 2xx."""
    return status == "OK" or (len(status) == 3 and status.startswith("2") and status.isdigit())


class ExportHealth:
    """Whether export works, from the outcome of every export request: failing from the first
    failed attempt after the last success until the next success. ``/readyz`` turns not ready
    once it has been failing longer than a grace period."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.failing_since: float | None = None
        self.last_failure = ""
        self.last_ok: float | None = None

    def record(self, status: str) -> None:
        if _succeeded(status):
            self.failing_since = None
            self.last_ok = self._clock()
        elif status not in _DATA_CODES:
            self.last_failure = status
            if self.failing_since is None:
                self.failing_since = self._clock()

    def failing_for(self) -> float:
        return 0.0 if self.failing_since is None else self._clock() - self.failing_since


class _OutcomeCounter:
    """``export_requests`` as the exporter uses it (``.labels(signal, status).inc()``), also
    telling ``ExportHealth`` each outcome: readiness without a hook in the exporter."""

    def __init__(self, counter: Counter, health: ExportHealth):
        self._counter, self._health = counter, health

    def labels(self, *values: str, **kw: str) -> Any:
        child = self._counter.labels(*values, **kw)
        status = kw.get("status") or (values[1] if len(values) > 1 else "")
        health = self._health

        class _Child:
            def inc(self, amount: float = 1) -> None:
                health.record(status)
                child.inc(amount)

            def __getattr__(self, name: str) -> Any:
                return getattr(child, name)

        return _Child()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._counter, name)


class _ScrapeTimeGauges(Collector):
    """Gauges whose values come from callbacks at scrape time (queue depth, map fill)."""

    def __init__(self) -> None:
        self._queue: dict[str, Callable[[], int]] = {}
        self._queue_capacity: dict[str, int] = {}
        # name → (help, label, callback giving label value → count)
        self._counters: dict[str, tuple[str, str, Callable[[], dict[str, int]]]] = {}
        self._gauges: dict[str, tuple[str, str, Callable[[], dict[str, int]]]] = {}
        # cache name → (entries now, limit, evictions so far)
        self._caches: dict[str, tuple[Callable[[], int], int, Callable[[], int]]] = {}

    def _cache_families(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        entries = GaugeMetricFamily(f"{NS}_cache_entries", "Entries in each user-space cache that "
                                    "grows with the host", labels=["cache"])
        limit = GaugeMetricFamily(f"{NS}_cache_limit_entries", "Configured bound of each cache",
                                  labels=["cache"])
        evicted = CounterMetricFamily(f"{NS}_cache_evictions", "Entries dropped to keep each "
                                      "cache within its bound", labels=["cache"])
        for name, (size, bound, evictions) in sorted(self._caches.items()):
            try:
                n, e = size(), evictions()
            except Exception:   # noqa: BLE001 -- a component closing while scraped
                continue
            entries.add_metric([name], n)
            limit.add_metric([name], bound)
            evicted.add_metric([name], e)
        return entries, limit, evicted

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for name, (help_text, label, fn) in sorted(self._counters.items()):
            family = CounterMetricFamily(f"{NS}_{name}", help_text, labels=[label])
            for value, count in sorted(fn().items()):
                family.add_metric([value], count)
            yield family
        for name, (help_text, label, fn) in sorted(self._gauges.items()):
            gauge = GaugeMetricFamily(f"{NS}_{name}", help_text, labels=[label])
            for value, count in sorted(fn().items()):
                gauge.add_metric([value], count)
            yield gauge
        yield from self._cache_families()
        depth = GaugeMetricFamily(f"{NS}_exporter_queue_items", "Items waiting in the export queue",
                                  labels=["signal"])
        cap = GaugeMetricFamily(f"{NS}_exporter_queue_capacity_items",
                                "Capacity of the export queue", labels=["signal"])
        for signal, fn in sorted(self._queue.items()):
            depth.add_metric([signal], fn())
            cap.add_metric([signal], self._queue_capacity[signal])
        yield depth
        yield cap


class SelfTelemetry:
    """Every self-metric in one place, so names and labels stay consistent across modules."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge(f"{NS}_build_info", "Version of the agent (value is always 1)",
                                ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.source_up = Gauge(f"{NS}_source_up",
                               "1 when the source's BPF program is attached and read, else 0",
                               ["source"], registry=r)
        self.events_received = Counter(f"{NS}_source_events_received",
                                       "Events read from the kernel, per source", ["source"], registry=r)
        self.events_lost = Counter(f"{NS}_source_events_lost",
                                   "Events lost before user space saw them, per source and reason: the "
                                   "slots of each program's lost[] array (named in its bpf/*.h), and "
                                   "decode_error for records user space could not decode",
                                   ["source", "reason"], registry=r)
        self.exported_items = Counter(f"{NS}_exporter_sent_items",
                                      "Items the Collector accepted, per signal", ["signal"], registry=r)
        self.dropped_items = Counter(f"{NS}_exporter_dropped_items",
                                     "Items dropped before or during export, per signal and reason "
                                     "(queue_full, permanent_error, retries_exhausted, rejected, shutdown, too_large, "
                                     "disk_full)",
                                     ["signal", "reason"], registry=r)
        self.export_health = ExportHealth()
        requests = Counter(f"{NS}_exporter_requests",
                           "Export requests per signal and status: the gRPC status name, the HTTP status "
                           "code, or UNAVAILABLE/DEADLINE_EXCEEDED without an answer",
                           ["signal", "status"], registry=r)
        self.export_requests = _OutcomeCounter(requests, self.export_health)
        self.export_retries = Counter(f"{NS}_exporter_retries",
                                      "Export requests retried, per signal", ["signal"], registry=r)
        self.export_latency = Histogram(f"{NS}_exporter_request_duration_seconds",
                                        "Duration of one export request (one attempt)", ["signal"],
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                 0.5, 1, 2.5, 5, 10, 30),
                                        registry=r)
        self._gauges = _ScrapeTimeGauges()
        r.register(self._gauges)
        for signal in SIGNALS:
            self.exported_items.labels(signal)
            for reason in DROP_REASONS:
                self.dropped_items.labels(signal, reason)

    def declare_losses(self, source: str, reasons: Iterable[str]) -> None:
        """A 0 series for each way ``source`` can lose events, from start."""
        for reason in reasons:
            self.events_lost.labels(source, reason)

    def totals(self) -> dict[str, dict[str, float]]:
        """Running totals for the shutdown summary: sent and dropped per signal, lost per source."""
        out: dict[str, dict[str, float]] = {"sent": {}, "dropped": {}, "lost": {}}
        for key, counter, label in (("sent", self.exported_items, "signal"),
                                    ("dropped", self.dropped_items, "signal"),
                                    ("lost", self.events_lost, "source")):
            for metric in counter.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        k = sample.labels[label]
                        out[key][k] = out[key].get(k, 0) + sample.value
        return out

    def watch_queue(self, signal: str, depth: Callable[[], int], capacity: int) -> None:
        self._gauges._queue[signal] = depth
        self._gauges._queue_capacity[signal] = capacity

    def watch_counters(self, name: str, help_text: str, label: str,
                       counts: Callable[[], dict[str, int]]) -> None:
        """A counter family ``ebpf_receiver_<name>_total{label}`` whose values ``counts()`` gives
        at scrape time (e.g. a component's own running totals); registering a name again
        replaces it."""
        self._gauges._counters[name] = (help_text, label, counts)

    def watch_gauges(self, name: str, help_text: str, label: str,
                     values: Callable[[], dict[str, int]]) -> None:
        """A gauge family ``ebpf_receiver_<name>{label}`` read from ``values()`` at scrape time
        (sizes and capacities of a component's maps and caches)."""
        self._gauges._gauges[name] = (help_text, label, values)

    def watch_cache(self, name: str, entries: Callable[[], int], limit: int,
                    evictions: Callable[[], int] = lambda: 0) -> None:
        """``ebpf_receiver_cache_entries{cache=name}``, its ``…_limit_entries`` and
        ``…_evictions_total``, read at scrape time; ``name`` must be one of ``CACHES`` so the
        label set stays fixed. Registering a name again replaces it."""
        if name not in CACHES:
            raise ValueError(f"unknown cache {name!r}: add it to telemetry.CACHES")
        self._gauges._caches[name] = (entries, int(limit), evictions)

    def caches(self) -> dict[str, tuple[int, int, int]]:
        """(entries, limit, evictions) per watched cache, e.g. for the shutdown log and benchmarks."""
        return {name: (size(), bound, ev()) for name, (size, bound, ev)
                in sorted(self._gauges._caches.items())}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("telemetry http: " + format, *args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    ssl_context: ssl.SSLContext | None = None

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = self.socket.accept()
        if self.ssl_context is None:
            return sock, addr
        sock.settimeout(10)   # the handshake runs in the request's thread, never in accept
        return self.ssl_context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        """A failed handshake or a dropped client: not worth a traceback on stderr."""
        import sys

        log.debug("telemetry http: request from %s failed: %s", client_address, sys.exc_info()[1])


class _TLSHandler(_QuietHandler):
    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()


class TelemetryServer:
    """HTTP server for ``/metrics``, ``/healthz`` (event loop alive) and ``/readyz`` (pipeline up).

    Runs in its own thread so a scrape never waits on the event loop, and a stuck loop shows as
    an unhealthy ``/healthz`` instead of a hung scrape.
    """

    def __init__(self, telemetry: SelfTelemetry, host: str, port: int,
                 heartbeat_timeout: float = 10.0, readiness_grace: float = 30.0,
                 web: WebConfig | None = None):
        self.telemetry = telemetry
        self.web = web
        self.host, self.port = host, port
        self.heartbeat_timeout = heartbeat_timeout
        self.readiness_grace = readiness_grace
        self.ready = False
        self.not_ready_reason = "starting"
        self._last_beat = time.monotonic()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._metrics_app = make_wsgi_app(telemetry.registry)

    def beat(self) -> None:
        """Called from the event loop; ``/healthz`` fails when beats stop."""
        self._last_beat = time.monotonic()

    def _app(self, environ, start_response):  # type: ignore[no-untyped-def]
        path = environ.get("PATH_INFO", "/")
        if self.web is not None and not self.web.authorized(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                 ("WWW-Authenticate", 'Basic realm="ebpf-otlp-receiver"')])
            return [b"unauthorized\n"]
        if path == "/healthz":
            age = time.monotonic() - self._last_beat
            ok = age < self.heartbeat_timeout
            body = b"ok\n" if ok else f"event loop stalled for {age:.1f}s\n".encode()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [body]
        if path == "/readyz":
            ready, reason = self.ready, self.not_ready_reason
            health = self.telemetry.export_health
            failing = health.failing_for()
            if ready and failing > self.readiness_grace:
                ready = False
                reason = (f"export to the Collector failing for {failing:.0f}s "
                          f"(last status {health.last_failure})")
            body = b"ready\n" if ready else f"not ready: {reason}\n".encode()
            start_response("200 OK" if ready else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [body]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def start(self) -> None:
        tls = self.web.ssl_context if self.web else None
        try:
            self._server = make_server(self.host, self.port, self._app, _ThreadingWSGIServer,
                                       handler_class=_TLSHandler if tls else _QuietHandler)
        except OSError as e:
            raise ReceiverError(f"telemetry.listen {self.host}:{self.port}: {e.strerror}") from None
        self._server.ssl_context = tls
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="telemetry-http",
                                        daemon=True)
        self._thread.start()
        log.info("self-metrics on %s://%s:%d/metrics%s", "https" if tls else "http",
                 self.host or "0.0.0.0", self.port,
                 " (basic auth)" if self.web and self.web.users else "")

    def restart_thread(self) -> None:
        """Serves from a new thread (same socket): it and its request threads then carry the
        calling thread's credentials, e.g. after capabilities were dropped."""
        if self._server is None:
            return
        self._server.shutdown()
        self._thread = threading.Thread(target=self._server.serve_forever, name="telemetry-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
