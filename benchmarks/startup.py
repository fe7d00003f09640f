"""Start-up: how long the agent and ``profile`` take to be useful, on a cold compile cache (every
program compiled by BCC in a loader process) and a warm one (loaded from the cache through
libbpf), in the same run and against the same fresh cache directory.

Prints:
  cold_agent_ready_s    from launching the agent (process, network, syscalls, profiler) with an
                        empty cache to all four ``ebpf_receiver_source_up`` being 1
  agent_ready_s         the same, launched again on the cache the first run filled (goal <= 2.0 s)
  cold_profile_attach_s from launching ``ebpf-otlp-receiver profile --pid P`` (P spins on a CPU)
                        to its first sample, with no cache entry for its program
  profile_attach_s      the same on a warm cache (goal <= 1.0 s)
``profile`` prints "attached; sampling" once its perf events are enabled; P is always on a CPU,
so its first sample follows within one sampling period: the attach figures are the time to that
line plus one period (1/99 s).

Smoke mode (``--smoke``): the same steps with the process source alone in the agent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._support import compile_c, discarding_collector_yaml, otelcol_bin

SOURCES = ("process", "network", "syscalls", "profiler")
FREQUENCY = 99
SPIN_C = r"""
static volatile unsigned long sink;
int main(void) { for (;;) sink++; }
"""
TIMEOUT_S = 300.0


def _agent_ready(agent: object, sources: tuple[str, ...]) -> float:
    from tests.harness import Agent

    assert isinstance(agent, Agent)
    launched = time.monotonic()
    agent.start(wait_ready=False)
    assert agent.proc is not None
    while True:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited {agent.proc.returncode}: {agent.log()[-3000:]}")
        try:
            up = _sources_up(agent.scrape())
        except OSError:
            up = set()
        if up >= set(sources):
            return time.monotonic() - launched
        if time.monotonic() - launched > TIMEOUT_S:
            raise AssertionError(f"sources not all up after {TIMEOUT_S:.0f} s: {agent.log()[-3000:]}")
        time.sleep(0.05)


def _sources_up(text: str) -> set[str]:
    """Sources whose ``ebpf_receiver_source_up`` is 1, from one scrape."""
    out = set()
    for line in text.splitlines():
        if line.startswith("ebpf_receiver_source_up{") and line.rstrip().endswith(" 1.0"):
            m = re.search(r'source="(\w+)"', line)
            if m:
                out.add(m[1])
    return out


def _profile_attach(pid: int, env: dict[str, str], workdir: Path) -> float:
    """Seconds from launching ``profile --pid`` to its first sample (see the module docstring)."""
    out = workdir / f"profile-{time.monotonic_ns()}.pb.gz"
    launched = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "receiver", "profile", "--pid", str(pid), "--duration", "1s",
                             "--frequency", str(FREQUENCY), "--output", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stderr is not None
    attached = None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if attached is None and line.startswith("attached; sampling"):
            attached = time.monotonic() - launched
    if proc.wait() != 0 or attached is None:
        raise AssertionError(f"profile failed ({proc.returncode}): {''.join(lines)[-3000:]}")
    samples = next((ln for ln in lines if " samples in " in ln), "")
    if not samples or samples.split(": ", 1)[-1].startswith("0 samples"):
        raise AssertionError(f"profile recorded no samples: {''.join(lines)[-2000:]}")
    return attached + 1 / FREQUENCY


def run(smoke: bool = False) -> int:
    from tests.harness import Agent, Collector

    sources = ("process",) if smoke else SOURCES
    workdir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    cache = workdir / "cache"
    env = {**os.environ, "EBPF_RECEIVER_CACHE_DIR": str(cache)}
    spin = subprocess.Popen([str(compile_c(SPIN_C, workdir / "spin", "-O2"))])
    (workdir / "otelcol.yaml").write_text(discarding_collector_yaml(("traces", "metrics", "logs", "profiles")))
    collector = Collector(otelcol_bin(), workdir, config=workdir / "otelcol.yaml").start()
    config = {"exporter": {"endpoint": collector.endpoint}, "bpf": {"cache_dir": str(cache)},
              "sources": {name: {"enabled": name in sources} for name in SOURCES}}
    figures: dict[str, float] = {}
    try:
        for label in ("cold_agent_ready_s", "agent_ready_s"):
            agent = Agent(workdir, config)
            try:
                figures[label] = _agent_ready(agent, sources)
            finally:
                agent.stop(timeout=300)
            print(f"startup: {label} {figures[label]:.2f} s", flush=True)
        for label in ("cold_profile_attach_s", "profile_attach_s"):
            figures[label] = _profile_attach(spin.pid, env, workdir)
            print(f"startup: {label} {figures[label]:.2f} s", flush=True)
    finally:
        spin.kill()
        spin.wait()
        collector.stop()
    entries = len(list((cache / "bpf").glob("*.entry")))
    print(f"startup: {entries} cache entries, {sum(p.stat().st_size for p in (cache / 'bpf').glob('*.entry'))} "
          f"bytes in {cache}")
    for label in ("profile_attach_s", "agent_ready_s", "cold_agent_ready_s", "cold_profile_attach_s"):
        print(f"bench: startup {label}={figures[label]:.2f} s")
    return 0
