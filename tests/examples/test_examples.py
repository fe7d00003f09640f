"""Every example in ``examples/`` (the design document's snippets in Python) runs unchanged
against the real Collector, and what it sent is read back from the Collector's output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from typing import Any

from ..harness import REPO, Collector, wait_until

EXAMPLES = REPO / "examples"


def _run(collector: Collector, name: str, service: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SERVICE_NAME": service,
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "EXAMPLE_RUN": service, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, capture_output=True, text=True,
                       timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _spans(collector: Collector, service: str) -> list[dict[str, Any]]:
    return [s for s in collector.spans() if s["resource"].get("service.name") == service]


def test_every_example_is_tested() -> None:
    tested = {"ebpf_complete_example.py", "event_to_span.py", "event_to_metric.py", "filtering.py",
              "error_handling.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_event_to_span(collector: Collector) -> None:
    service = f"example-{uuid.uuid4().hex[:8]}"
    _run(collector, "event_to_span.py", service)
    spans = wait_until(lambda: _spans(collector, service), 30, 0.2, "the example's span")
    (span,) = spans
    assert span["name"] == "network packet transmit"
    assert span["attrs"]["network.protocol"] == "TCP" and span["attrs"]["example.run"] == service
    assert span["attrs"]["process.pid"] == 1234 and span["attrs"]["thread.id"] == 5678


def test_event_to_metric_in_a_batch(collector: Collector) -> None:
    service = f"example-{uuid.uuid4().hex[:8]}"
    _run(collector, "event_to_metric.py", service)

    def points() -> list[dict[str, Any]]:
        return [dp for m in collector.metrics() if m["resource"].get("service.name") == service
                and m["name"] == "syscall.duration" for dp in m["histogram"]["dataPoints"]]

    (dp,) = wait_until(points, 30, 0.2, "the example's syscall.duration histogram")
    assert int(dp["count"]) == 10 and dp["sum"] == sum(1_000 * (i + 1) for i in range(10))


def test_filtering_converts_only_cpu_samples(collector: Collector) -> None:
    service = f"example-{uuid.uuid4().hex[:8]}"
    r = _run(collector, "filtering.py", service)
    assert "converted 2 of 4 events" in r.stdout
    spans = wait_until(lambda: _spans(collector, service), 30, 0.2, "the example's spans")
    wait_until(lambda: len(_spans(collector, service)) >= 2, 10, 0.2, "both spans")
    assert sorted(s["name"] for s in _spans(collector, service)) == ["cpu sample", "cpu sample"], spans


def test_error_handling_sends_the_good_event_only(collector: Collector) -> None:
    service = f"example-{uuid.uuid4().hex[:8]}"
    r = _run(collector, "error_handling.py", service)
    assert "converted: syscall" in r.stderr and "no tracer set" in r.stderr
    assert "conversion failed: NETWORK_CONNECTION events need the attributes tcp.connection.direction" in r.stderr
    (span,) = wait_until(lambda: _spans(collector, service), 30, 0.2, "the example's span")
    assert span["name"] == "openat" and span["attrs"]["error.type"] == "ENOENT"
    assert span["status"]["code"] == 2   # error


def test_complete_example_sends_the_profile_and_a_span(bpf_ok: None, collector: Collector) -> None:
    service = f"example-{uuid.uuid4().hex[:8]}"
    r = _run(collector, "ebpf_complete_example.py", service)
    assert re.search(r"[1-9]\d* profile\(s\) \(one per process\) accepted by the Collector", r.stdout), r.stdout
    (span,) = wait_until(lambda: _spans(collector, service), 30, 0.2, "the workload span")
    assert span["name"] == "cpu sample" and span["attrs"]["example"] == "ebpf_complete_example"

    def example_samples() -> int:
        total = 0
        for req in collector.requests("profiles"):
            for rp in req.get("resourceProfiles", []):
                for sp in rp.get("scopeProfiles", []):
                    for p in sp.get("profiles", []):
                        total += sum(int(v) for s in p.get("samples", []) for v in s.get("values", []))
        return total

    assert wait_until(example_samples, 30, 0.2, "the example's profile samples") > 0
