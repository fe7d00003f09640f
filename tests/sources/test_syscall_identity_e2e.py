"""Per-process syscall series carry the process's name in their resource, also for a process
that is gone from /proc before the series are first read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..harness import Collector, wait_until
from .test_syscalls_e2e import N_FAIL, PROG, N, _agent, _latest, prog  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.collector]


def test_series_of_a_finished_process_name_it(bpf_ok: None, collector: Collector, tmp_path: Path,
                                              prog: Path) -> None:  # noqa: F811
    agent = _agent(collector, tmp_path, report_interval="2s")
    try:
        proc = subprocess.Popen([str(prog), "count", str(N), str(N_FAIL)])
        assert proc.wait() == 0   # gone long before the first read, 2 s after attach
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]

    def series() -> list | None:
        out = [m for m in collector.metrics() if m.get("name") == "syscall.calls"
               and m["resource"].get("process.pid") == proc.pid]
        return out or None

    found = wait_until(series, 20, 0.2, "the test program's syscall series")
    assert _latest(collector.metric_points("syscall.calls", proc.pid), **{"syscall.name": "uname"})
    for m in found:
        assert m["resource"].get("process.executable.name") == PROG, m["resource"]
