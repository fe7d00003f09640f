"""Self-metrics: scraped by a real Prometheus server and read back through its HTTP API."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .harness import Agent, Collector, agent_config, free_port, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def test_prometheus_scrapes_self_metrics(bpf_ok: None, prometheus_bin: str, collector: Collector,
                                         tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: agent\n    static_configs: [{{targets: ['127.0.0.1:{agent.metrics_port}']}}]\n")
    prom = subprocess.Popen([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _get(f"http://127.0.0.1:{agent.metrics_port}/healthz")[0] == 200
        assert _get(f"http://127.0.0.1:{agent.metrics_port}/readyz")[0] == 200
        for _ in range(20):
            subprocess.run(["/bin/true"], check=True)
        # Everything exported, and the counters say so.
        wait_until(lambda: agent.metric_value("ebpf_receiver_exporter_sent_items_total", signal="logs") >= 40,
                   20, what="logs exported")

        def query(expr: str) -> list[dict]:
            q = urllib.parse.urlencode({"query": expr})
            status, body = _get(f"http://127.0.0.1:{prom_port}/api/v1/query?{q}")
            return json.loads(body)["data"]["result"] if status == 200 else []

        def value(expr: str) -> float | None:
            r = query(expr)
            return float(r[0]["value"][1]) if r else None

        wait_until(lambda: (value('ebpf_receiver_exporter_sent_items_total{signal="logs"}') or 0) >= 40,
                   60, 0.5, "Prometheus to scrape the agent")
        assert value('ebpf_receiver_source_up{source="process"}') == 1
        assert (value('ebpf_receiver_source_events_received_total{source="process"}') or 0) >= 40
        assert value('ebpf_receiver_exporter_requests_total{signal="logs",status="OK"}') >= 1
        assert value('ebpf_receiver_build_info') == 1
        assert value('ebpf_receiver_exporter_queue_capacity_items{signal="logs"}') == 20000
        # No loss in a quiet run: the lost counter series is absent or zero.
        assert (value('sum(ebpf_receiver_source_events_lost_total)') or 0) == 0
    finally:
        prom.terminate()
        prom.wait(10)
        agent.stop()


def test_unknown_path_and_readiness_before_start(tmp_path: Path) -> None:
    from receiver.telemetry import SelfTelemetry, TelemetryServer

    srv = TelemetryServer(SelfTelemetry(), "127.0.0.1", 0)
    srv.start()
    try:
        assert _get(f"http://127.0.0.1:{srv.port}/readyz") == (503, "not ready: starting\n")
        assert _get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200
        assert _get(f"http://127.0.0.1:{srv.port}/nope")[0] == 404
        srv.ready = True
        assert _get(f"http://127.0.0.1:{srv.port}/readyz")[0] == 200
    finally:
        srv.stop()
