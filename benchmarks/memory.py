"""Where the agent's memory goes (issue 16): the real agent with all four sources (profiler preset
development) exporting to a real Collector. Prints start-up time (process start to /readyz, all
sources attached), peak RSS (VmHWM) and RSS after ``SETTLE_S``, ``/proc/PID/smaps_rollup``, the
largest mappings by RSS (grouped by file; anonymous memory as one row) and whether BCC's compiler
(libbcc, libLLVM, libclang-cpp) is mapped. The loaders' own peaks come from the agent's log.

Smoke mode (``--smoke``): the same, with 3 s instead of ``SETTLE_S`` after ready."""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from ._support import otelcol_bin

SETTLE_S = 25.0
SMOKE_SETTLE_S = 3.0
ALL_FOUR = {"profiler": {"preset": "development"}, "process": {}, "network": {}, "syscalls": {}}


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mappings_mb(pid: int) -> dict[str, float]:
    """RSS by mapping (file path, or [heap]/[anon]/...), in MB."""
    out: dict[str, float] = defaultdict(float)
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = head[5] if len(head) > 5 else "[anon]"
        elif head and head[0] == "Rss:":
            out[name] += int(head[1]) / 1024
    return dict(out)


def report(pid: int, label: str) -> None:
    print(f"  {label}: VmHWM {_status_mb(pid, 'VmHWM'):.1f} MB, VmRSS {_status_mb(pid, 'VmRSS'):.1f} MB")
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    keep = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")
    print("  smaps_rollup: " + ", ".join(f"{k} {int(v) / 1024:.1f}" for k, v, _ in (ln.split() for ln in rollup)
                                         if k.rstrip(":") in keep) + " (MB)")
    maps = mappings_mb(pid)
    for path, mb in sorted(maps.items(), key=lambda kv: -kv[1])[:14]:
        print(f"    {mb:7.1f} MB  {path}")
    compiler = sorted(p for p in maps if re.search(r"libbcc|libLLVM|libclang", p))
    print(f"  compiler libraries mapped: {', '.join(compiler) or 'none'}")


def run(smoke: bool = False) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.harness import Agent, Collector, agent_config

    settle = SMOKE_SETTLE_S if smoke else SETTLE_S
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    collector = Collector(otelcol_bin(), workdir).start()
    agent = Agent(workdir, agent_config(collector, ALL_FOUR))
    try:
        t0 = time.monotonic()
        agent.start()
        ready = time.monotonic() - t0
        assert agent.proc is not None
        pid = agent.proc.pid
        print(f"memory: agent with all four sources; ready (all attached) after {ready:.2f} s")
        report(pid, "at ready")
        time.sleep(settle)
        report(pid, f"after {settle:.0f} s")
        hwm, rss = _status_mb(pid, "VmHWM"), _status_mb(pid, "VmRSS")
        rc = agent.stop()
        loaders = re.findall(r"source (\w+): .*loader peak RSS ([\d.]+) MB", agent.log())
        for name, mb in loaders:
            print(f"  loader of {name}: peak RSS {mb} MB")
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
        collector.stop()
    print(f"bench: memory startup={ready:.2f} s")
    print(f"bench: memory rss_peak={hwm:.1f} MB")
    print(f"bench: memory rss_steady={rss:.1f} MB")
    return rc
