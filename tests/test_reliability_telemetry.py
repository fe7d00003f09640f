"""Self-telemetry guarantees: a 0 series for every loss reason from start, ``/readyz`` follows
whether export works (with a grace period) while ``/healthz`` stays liveness, and the shutdown
log ends with what was sent, dropped and detached."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.sources.process import ProcessSource
from receiver.telemetry import DROP_REASONS, SIGNALS

from .harness import Agent, Collector, agent_config, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_every_loss_reason_has_a_zero_series_from_start(bpf_ok: None, collector: Collector,
                                                         tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    try:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(agent.scrape()) for s in fam.samples}
    finally:
        agent.stop()
    for reason in (*ProcessSource.lost_reasons, "decode_error"):
        key = ("ebpf_receiver_source_events_lost_total", (("reason", reason), ("source", "process")))
        assert samples.get(key) == 0, key
    for signal in SIGNALS:
        for reason in DROP_REASONS:
            key = ("ebpf_receiver_exporter_dropped_items_total", (("reason", reason), ("signal", signal)))
            assert samples.get(key) == 0, key


def test_readyz_follows_export_and_healthz_stays_live(bpf_ok: None, otelcol_bin: str,
                                                       collector: Collector, tmp_path: Path) -> None:
    cfg = agent_config(collector, {"process": {}},
                       exporter={"timeout": "1s", "retry": {"initial_interval": "200ms",
                                                            "max_interval": "500ms"}},
                       telemetry={"readiness_grace": "2s"})
    agent = Agent(tmp_path, cfg).start()
    base = f"http://127.0.0.1:{agent.metrics_port}"
    again = None
    try:
        subprocess.run(["/bin/true"], check=True)
        wait_until(lambda: agent.metric_value("ebpf_receiver_exporter_requests_total", status="OK") >= 1,
                   20, what="a first successful export")
        assert _status(f"{base}/readyz")[0] == 200
        collector.kill()

        def not_ready() -> str | None:
            subprocess.run(["/bin/true"], check=True)
            code, body = _status(f"{base}/readyz")
            return body if code == 503 else None

        body = wait_until(not_ready, 30, 0.3, "/readyz to fail while the Collector is down")
        assert "export to the Collector failing" in body, body
        assert _status(f"{base}/healthz")[0] == 200   # alive: a restart would not help
        again = Collector(otelcol_bin, tmp_path, port=collector.port).start()
        wait_until(lambda: _status(f"{base}/readyz")[0] == 200, 30, 0.3,
                   "/readyz to recover once the Collector is back")
    finally:
        agent.stop()
        if again:
            again.stop()


def test_shutdown_log_ends_with_a_summary(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    for _ in range(5):
        subprocess.run(["/bin/true"], check=True)
    wait_until(lambda: agent.metric_value("ebpf_receiver_exporter_sent_items_total") >= 10, 20,
               what="items sent")
    assert agent.stop() == 0
    last = agent.log().strip().splitlines()[-1]
    m = re.search(r"shutdown: sent (\d+) \(logs \d+\) items, dropped 0, lost in the kernel 0; "
                  r"detached 1 source\(s\) \(process\)$", last)
    assert m, last
    assert int(m.group(1)) >= 10
