"""Sources start in parallel: the race that made parallel start look guilty, pinned down.

Starting the sources at once (asyncio.gather) once coincided with the kernel guests' syscalls
smoke test losing the second short-lived process's ``uname`` series (agent log clean, nothing
counted as dropped). The cause was not the gather but a race in the syscalls source's collect,
which any change of timing could expose (the gather moved the phase of the 1 s collect timer
against the test's processes under emulation): the collect read the maps, *then* asked /proc
which of the processes read were gone, sent those as finished and deleted every map entry of
theirs. A process that made its calls and ended between the read and the /proc check had those
calls deleted without ever being sent. This test makes the process end exactly there, with the
real BPF program."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from receiver.config import EbpfConfig
from receiver.kernel.clock import KernelClock
from receiver.sources.base import SourceContext
from receiver.sources.syscalls import SyscallsSource
from receiver.telemetry import SelfTelemetry

from .harness import compile_c

pytestmark = [pytest.mark.bpf]

PROG = "scrace_prog"
N = 300
SOURCE = r"""
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

int main(void) {
    char c;
    struct utsname u;
    for (int i = 0; i < 10; i++)
        syscall(SYS_getppid);
    if (write(1, "r", 1) != 1 || read(0, &c, 1) != 1)   /* ready; wait for the go */
        return 2;
    for (int i = 0; i < %d; i++)
        syscall(SYS_uname, &u);
    return 0;
}
"""


class _Recorder:
    def __init__(self) -> None:
        self.snapshots: list[Any] = []

    def consume_event(self, record: Any) -> None:
        pass

    def consume_metrics(self, snapshot: Any) -> None:
        self.snapshots.append(snapshot)

    def consume_profile(self, profile: Any) -> None:
        pass


def test_a_process_ending_during_a_collect_keeps_its_calls(bpf_ok: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    prog = compile_c(SOURCE % N, tmp_path / PROG, "-O1")
    config = EbpfConfig.from_dict({"sources": {
        "process": {"enabled": False}, "network": {"enabled": False}, "profiler": {"enabled": False},
        "syscalls": {"enabled": True, "report_interval": "1h", "filter": {"process_names": [PROG]}}}})
    recorder = _Recorder()
    source = SyscallsSource(SourceContext(config, recorder, SelfTelemetry(), KernelClock()))
    exists = os.path.exists
    proc: subprocess.Popen[bytes] | None = None

    def ends_when_asked(path: Any) -> bool:
        # The process is asked about while a collect runs: it makes its uname calls and ends
        # (reaped) right then, and the answer is the true one, after it.
        if proc is not None and str(path) == f"/proc/{proc.pid}" and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.write(b"g")
            proc.stdin.close()
            assert proc.wait(30) == 0
        return exists(path)

    async def run() -> None:
        nonlocal proc
        await source.start()
        try:
            proc = subprocess.Popen([str(prog)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.read(1) == b"r"
            source.collect()   # sees the process (its getppid calls) alive: asks again next time
            monkeypatch.setattr(os.path, "exists", ends_when_asked)
            source.collect()   # the process ends while this one runs
            monkeypatch.setattr(os.path, "exists", exists)
            source.collect()
        finally:
            await source.stop()   # collects once more
            if proc is not None:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
                for f in (proc.stdin, proc.stdout):
                    if f is not None:
                        f.close()

    asyncio.run(run())
    assert proc is not None and proc.returncode == 0
    unames = [dict(s.by_pid[proc.pid].calls).get("uname") for s in recorder.snapshots
              if proc.pid in s.by_pid]
    assert N in unames, f"the process's uname calls never went out: {unames}"
    assert any(proc.pid in s.finished_pids for s in recorder.snapshots), "the process never finished"


def test_warm_cache_fills_the_cache_the_agent_then_loads_from(bpf_ok: None, tmp_path: Path) -> None:
    """``warm-cache`` compiles the enabled sources' programs into the cache and leaves nothing
    running; run again it finds them there (the same key the agent computes at start)."""
    import yaml

    cache = tmp_path / "cache"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"bpf": {"cache_dir": str(cache)}, "sources": {
        "process": {"enabled": True}, "network": {"enabled": False}, "profiler": {"enabled": False},
        "syscalls": {"enabled": False}}}))
    repo = Path(__file__).resolve().parents[1]

    def warm() -> str:
        p = subprocess.run([sys.executable, "-m", "receiver",
                            "warm-cache", "--config", str(cfg), "--no-profile"],
                           cwd=repo, capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    first = warm()
    assert "process    cached" in first, first
    assert len(list((cache / "bpf").glob("*.entry"))) == 1
    assert "process    already cached" in warm()


def test_metrics_answer_before_the_sources_are_up_and_readyz_waits_for_them(
        bpf_ok: None, collector: Any, tmp_path: Path) -> None:
    """Start-up order: ``/metrics`` answers from the start, each source's
    ``ebpf_receiver_source_up`` is 0 until it is loaded, and ``/readyz`` is 503 ("starting")
    until every enabled source is up (or disabled) and the exporter runs. The cache is empty, so
    the program is compiled (seconds) while the scrapes below watch."""
    import urllib.error
    import urllib.request

    from .harness import Agent, agent_config, wait_until

    config = agent_config(collector, {"process": {}}, bpf={"cache_dir": str(tmp_path / "cache")})
    agent = Agent(tmp_path, config).start(wait_ready=False)
    seen: list[tuple[str, int, str]] = []   # (source_up of process, /readyz status, its body)

    def observe() -> bool:
        if agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(f"agent exited: {agent.log()[-3000:]}")
        try:
            text = agent.scrape()
        except OSError:
            return False
        up = next((ln.rsplit(" ", 1)[1] for ln in text.splitlines()
                   if ln.startswith('ebpf_receiver_source_up{source="process"}')), "absent")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/readyz", timeout=5) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        seen.append((up, status, body.strip()))
        return status == 200

    try:
        wait_until(observe, 120, 0.02, "the agent to be ready")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    assert seen[0][:2] == ("0.0", 503) and seen[0][2] == "not ready: starting", seen[:3]
    assert seen[-1][:2] == ("1.0", 200), seen[-3:]
    assert all(status == 503 for _, status, _ in seen[:-1]), seen


def test_sources_start_at_once_and_the_profiler_after_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's start order, with stand-in sources: the others all begin before any is up,
    and the profiler begins once they are (its first records hold the event loop)."""
    from receiver import service as service_mod
    from receiver.kernel import privileges
    from receiver.sources.base import Source

    events: list[tuple[str, str]] = []

    def stand_in(source_name: str) -> type[Source]:
        class StandIn(Source):
            name = source_name

            async def start(self) -> None:
                events.append(("start", self.name))
                for _ in range(3):   # a load's await points
                    await asyncio.sleep(0)
                events.append(("up", self.name))

            async def stop(self) -> None:
                pass

        return StandIn

    names = ("process", "syscalls", "network", "profiler")
    monkeypatch.setattr(service_mod, "source_classes", lambda: {n: stand_in(n) for n in names})
    config = EbpfConfig.from_dict({"sources": {n: {"enabled": True} for n in names}})
    svc = service_mod.Service(config, least_privilege=False)

    async def run() -> None:
        await svc._start_sources(asyncio.get_running_loop(), privileges.StartupThreads())

    asyncio.run(run())
    others = [n for n in config.sources.enabled() if n != "profiler"]
    first_up = next(i for i, e in enumerate(events) if e[0] == "up")
    assert {n for kind, n in events[:first_up] if kind == "start"} == set(others), events
    assert events[-2:] == [("start", "profiler"), ("up", "profiler")], events
    assert [s.name for s in svc.sources] == list(config.sources.enabled())
