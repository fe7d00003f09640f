"""The on-disk queue as users run it (issue 18): the real agent, the Collector down for 60 s
while exec events arrive faster than the memory queue holds, and the agent restarted in the middle
of the outage. After recovery every exec the agent saw arrives exactly once."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from ..harness import Agent, Collector, wait_until

OUTAGE_S = 60.0


def _run_marked(marker: str, first: int, n: int) -> None:
    for i in range(first, first + n):
        subprocess.run(["/bin/true", f"{marker}-{i}"], check=True)
        time.sleep(0.02)


def _marked_execs(collector: Collector, marker: str) -> list[str]:
    out = []
    for rec in collector.log_records():
        args = rec["attrs"].get("process.command_args") or []
        out.extend(a for a in args if isinstance(a, str) and a.startswith(marker + "-"))
    return out


def test_outage_with_an_agent_restart_loses_and_duplicates_nothing(
        bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    marker = f"dq{uuid.uuid4().hex[:10]}"
    queue_dir = tmp_path / "queue"
    config = {
        "exporter": {"endpoint": collector.endpoint, "queue_size": 64, "max_batch_size": 32,
                     "batch_timeout": "200ms", "disk_queue_directory": str(queue_dir),
                     "retry": {"initial_interval": "500ms", "max_interval": "2s", "max_elapsed_time": "10m"},
                     "shutdown_timeout": "3s"},
        "sources": {"process": {"enabled": True, "command_line": "full"}, "profiler": {"enabled": False},
                    "network": {"enabled": False}, "syscalls": {"enabled": False}},
    }
    agents = [Agent(tmp_path, config).start()]
    first = agents[0]
    collector.stop()                                   # the outage begins
    down_at = time.monotonic()
    try:
        _run_marked(marker, 0, 150)                    # ~450 records (fork, exec, exit): over 64
        # Every one of them reached the agent before it stops (they are in memory or on disk).
        wait_until(lambda: first.metric_value("ebpf_receiver_source_events_received_total",
                                              source="process") >= 450, 30, 0.2, "the first agent's records")
        assert first.metric_value("ebpf_receiver_exporter_dropped_items_total", reason="queue_full") == 0
        assert first.stop() == 0, first.log()[-3000:]  # mid-outage restart
        assert any(queue_dir.rglob("*")), "nothing waits on disk"
        second = Agent(tmp_path, config).start()
        agents.append(second)
        _run_marked(marker, 150, 150)
        wait_until(lambda: time.monotonic() - down_at >= OUTAGE_S, OUTAGE_S + 5, 1.0, "the outage to last")
        collector.start()                              # recovery
        seen = wait_until(lambda: (m := _marked_execs(collector, marker)) and len(m) >= 300 and m,
                          120, 1.0, "every exec to arrive")
        time.sleep(3)                                  # anything sent twice would arrive by now
        seen = _marked_execs(collector, marker)
        assert sorted(seen) == sorted(f"{marker}-{i}" for i in range(300)), (
            len(seen), len(set(seen)))
        for name in ("queue_full", "disk_full", "retries_exhausted", "shutdown"):
            assert second.metric_value("ebpf_receiver_exporter_dropped_items_total", reason=name) == 0, name
        assert second.stop() == 0
    finally:
        for a in agents:
            if a.proc and a.proc.poll() is None:
                a.stop()
