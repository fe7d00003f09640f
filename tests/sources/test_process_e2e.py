"""Process lifecycle, end to end: real BPF program → agent → real Collector → its file output."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ..harness import Agent, Collector, agent_config, compile_c, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

RUNS = 50


def test_exec_and_exit_records_are_exact(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    try:
        for _ in range(RUNS):
            subprocess.run(["/bin/true"], check=True)
        sh = subprocess.run(["/bin/sh", "-c", "exit 3"])
        assert sh.returncode == 3
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]

    def true_records() -> tuple[list, list] | None:
        recs = collector.log_records()
        execs = [r for r in recs if r.get("eventName") == "process.exec"
                 and r["attrs"].get("process.executable.path") == "/bin/true"]
        pids = {r["attrs"]["process.pid"] for r in execs}
        exits = [r for r in recs if r.get("eventName") == "process.exit"
                 and r["attrs"]["process.pid"] in pids]
        return (execs, exits) if len(execs) >= RUNS and len(exits) >= RUNS else None

    found = wait_until(true_records, 20, 0.2, "50 exec and 50 exit records")
    execs, exits = found
    assert len(execs) == RUNS
    assert len(exits) == RUNS
    assert all(r["attrs"]["process.exit.code"] == 0 for r in exits)
    # Identity on each record and its resource.
    e = execs[0]
    assert e["attrs"]["process.command_line"] == "/bin/true"
    # subprocess.run forks every /bin/true (and the sh below) from this test process: its pid
    # is the parent of each, exactly (a tid, 0, the child's own pid or pid 1 would all fail).
    assert {r["attrs"]["process.parent_pid"] for r in execs} == {os.getpid()}
    assert e["resource"]["process.pid"] == e["attrs"]["process.pid"]
    for key in ("host.name", "os.type", "service.name"):
        assert key in e["resource"], key
    assert e["resource"]["os.type"] == "linux"

    recs = collector.log_records()
    sh_exec = [r for r in recs if r.get("eventName") == "process.exec"
               and r["attrs"].get("process.command_line") == "/bin/sh -c exit 3"]
    assert len(sh_exec) == 1
    assert sh_exec[0]["attrs"]["process.parent_pid"] == os.getpid()
    sh_pid = sh_exec[0]["attrs"]["process.pid"]
    sh_exit = [r for r in recs if r.get("eventName") == "process.exit" and r["attrs"]["process.pid"] == sh_pid]
    assert [r["attrs"]["process.exit.code"] for r in sh_exit] == [3]


def test_secrets_in_command_line_are_redacted_by_default(bpf_ok: None, collector: Collector,
                                                          tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    try:
        subprocess.run(["/bin/echo", "--password=hunter2", "--token", "abc123", "plain"],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        agent.stop()

    def echo() -> list:
        return [r for r in collector.log_records() if r.get("eventName") == "process.exec"
                and r["attrs"].get("process.executable.path") == "/bin/echo"]

    recs = wait_until(echo, 20, what="the echo exec record")
    line = recs[0]["attrs"]["process.command_line"]
    assert "hunter2" not in line and "abc123" not in line
    assert line == "/bin/echo --password=REDACTED --token REDACTED plain"


def test_killed_process_reports_signal(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    try:
        p = subprocess.Popen(["/bin/sleep", "30"])
        wait_until(lambda: Path(f"/proc/{p.pid}/exe").exists(), 5)
        p.kill()
        p.wait()
    finally:
        agent.stop()

    def sleep_exit() -> list:
        return [r for r in collector.log_records() if r.get("eventName") == "process.exit"
                and r["attrs"]["process.pid"] == p.pid]

    recs = wait_until(sleep_exit, 20, what="the exit record of the killed sleep")
    assert recs[0]["attrs"]["process.exit.signal"] == 9
    assert recs[0]["attrs"]["process.exit.code"] == 128 + 9


LEADER_FIRST_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static void *worker(void *arg) {
    (void)arg;
    usleep(400 * 1000);
    exit(5);
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);   /* the leader ends first; the process lives on in the worker */
}
"""


def test_exit_is_reported_when_the_last_thread_ends(bpf_ok: None, collector: Collector,
                                                    tmp_path: Path) -> None:
    """A process whose main thread exits first: one exit record, when the process really ends,
    with the code the last thread gave."""
    binary = compile_c(LEADER_FIRST_C, tmp_path / "leader_first", "-O1", "-pthread")
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    try:
        p = subprocess.run([str(binary)])
        assert p.returncode == 5
    finally:
        agent.stop()

    def records() -> tuple[list, list] | None:
        recs = collector.log_records()
        execs = [r for r in recs if r.get("eventName") == "process.exec"
                 and r["attrs"].get("process.executable.path") == str(binary)]
        if not execs:
            return None
        pid = execs[0]["attrs"]["process.pid"]
        exits = [r for r in recs if r.get("eventName") == "process.exit"
                 and r["attrs"]["process.pid"] == pid]
        return (execs, exits) if exits else None

    execs, exits = wait_until(records, 20, what="the exec and exit records")
    assert len(exits) == 1
    assert exits[0]["attrs"]["process.exit.code"] == 5
    lived_ns = int(exits[0]["timeUnixNano"]) - int(execs[0]["timeUnixNano"])
    assert lived_ns >= 350_000_000, f"exit reported {lived_ns / 1e6:.0f} ms after exec"
