"""The agent's own health: Prometheus self-metrics on ``/metrics``, plus ``/healthz`` and ``/readyz``.

Our own ``CollectorRegistry`` (never the global one), so tests and embedders build fresh ones.
Every loss anywhere in the pipeline is a counter here, labelled by where it happened.
Queue depths are read at scrape time through callbacks.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ._version import __version__

__all__ = ["SelfTelemetry", "TelemetryServer"]

log = logging.getLogger(__name__)
NS = "ebpf_receiver"


class _ScrapeTimeGauges(Collector):
    """Gauges whose values come from callbacks at scrape time (queue depth, map fill)."""

    def __init__(self) -> None:
        self._queue: dict[str, Callable[[], int]] = {}
        self._queue_capacity: dict[str, int] = {}
        # name → (help, label, callback giving label value → count)
        self._counters: dict[str, tuple[str, str, Callable[[], dict[str, int]]]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for name, (help_text, label, fn) in sorted(self._counters.items()):
            family = CounterMetricFamily(f"{NS}_{name}", help_text, labels=[label])
            for value, count in sorted(fn().items()):
                family.add_metric([value], count)
            yield family
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
                                   "Events lost before user space saw them, per source and reason "
                                   "(ringbuf_full, map_full, stack_lost, decode_error, filtered_overflow)",
                                   ["source", "reason"], registry=r)
        self.exported_items = Counter(f"{NS}_exporter_sent_items",
                                      "Items the Collector accepted, per signal", ["signal"], registry=r)
        self.dropped_items = Counter(f"{NS}_exporter_dropped_items",
                                     "Items dropped before or during export, per signal and reason "
                                     "(queue_full, permanent_error, retries_exhausted, rejected, shutdown, too_large, "
                                     "disk_full)",
                                     ["signal", "reason"], registry=r)
        self.export_requests = Counter(f"{NS}_exporter_requests",
                                       "Export requests per signal and status: the gRPC status name, the HTTP "
                                       "status code, or UNAVAILABLE/DEADLINE_EXCEEDED without an answer",
                                       ["signal", "status"], registry=r)
        self.export_retries = Counter(f"{NS}_exporter_retries",
                                      "Export requests retried, per signal", ["signal"], registry=r)
        self.export_latency = Histogram(f"{NS}_exporter_request_duration_seconds",
                                        "Duration of one export request (one attempt)", ["signal"],
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                 0.5, 1, 2.5, 5, 10, 30),
                                        registry=r)
        self._gauges = _ScrapeTimeGauges()
        r.register(self._gauges)

    def watch_queue(self, signal: str, depth: Callable[[], int], capacity: int) -> None:
        self._gauges._queue[signal] = depth
        self._gauges._queue_capacity[signal] = capacity

    def watch_counters(self, name: str, help_text: str, label: str,
                       counts: Callable[[], dict[str, int]]) -> None:
        """A counter family ``ebpf_receiver_<name>_total{label}`` whose values ``counts()`` gives
        at scrape time (e.g. a component's own running totals); registering a name again
        replaces it."""
        self._gauges._counters[name] = (help_text, label, counts)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("telemetry http: " + format, *args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class TelemetryServer:
    """HTTP server for ``/metrics``, ``/healthz`` (event loop alive) and ``/readyz`` (pipeline up).

    Runs in its own thread so a scrape never waits on the event loop, and a stuck loop shows as
    an unhealthy ``/healthz`` instead of a hung scrape.
    """

    def __init__(self, telemetry: SelfTelemetry, host: str, port: int,
                 heartbeat_timeout: float = 10.0):
        self.telemetry = telemetry
        self.host, self.port = host, port
        self.heartbeat_timeout = heartbeat_timeout
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
        if path == "/healthz":
            age = time.monotonic() - self._last_beat
            ok = age < self.heartbeat_timeout
            body = b"ok\n" if ok else f"event loop stalled for {age:.1f}s\n".encode()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [body]
        if path == "/readyz":
            body = b"ready\n" if self.ready else f"not ready: {self.not_ready_reason}\n".encode()
            start_response("200 OK" if self.ready else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [body]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def start(self) -> None:
        self._server = make_server(self.host, self.port, self._app, _ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="telemetry-http",
                                        daemon=True)
        self._thread.start()
        log.info("self-metrics on http://%s:%d/metrics", self.host or "0.0.0.0", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
