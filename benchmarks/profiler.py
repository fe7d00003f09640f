"""The CPU profiler's cost: the agent's own CPU time (utime+stime from /proc/PID/stat) while it
profiles every process at 99 Hz and both cores are busy with many distinct stacks, as a share of
one core; and the agent's peak RSS (VmHWM). Target: below 1 % of a core.

The agent is the real one (``python -m receiver run`` with only the profiler source, preset
development, the default 10 s report interval) exporting to a real Collector. The load is two
processes, one per core, recursing to random depths through 64 functions, so thousands of
distinct stacks arrive per interval and every drain symbolizes new ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._support import compile_c, otelcol_bin

MEASURE_S = 30.0
WARMUP_S = 12.0       # past the first drain, which parses the ELF files once
N_FUNCTIONS = 64


def _load_source() -> str:
    """C: f0..f63 each spin a little then call a pseudo-randomly chosen next one, to a random depth."""
    funcs = [f"__attribute__((noinline)) void f{i}(unsigned d);" for i in range(N_FUNCTIONS)]
    bodies = []
    for i in range(N_FUNCTIONS):
        bodies.append(f"""
__attribute__((noinline)) void f{i}(unsigned d) {{
    for (int k = 0; k < 2000; k++) sink += k ^ d;
    if (d) table[next_rand() % {N_FUNCTIONS}](d - 1);
}}""")
    table = ", ".join(f"f{i}" for i in range(N_FUNCTIONS))
    return "\n".join([
        "#include <stdlib.h>",
        "#include <time.h>",
        "static volatile unsigned long sink;",
        "static unsigned long state = 88172645463325252UL;",
        ("static unsigned next_rand(void) { state ^= state << 13; state ^= state >> 7; "
         "state ^= state << 17; return (unsigned)state; }"),
        *funcs,
        f"static void (*table[{N_FUNCTIONS}])(unsigned) = {{{table}}};",
        *bodies,
        "int main(int argc, char **argv) {",
        "    state ^= (unsigned long)atol(argv[2]) * 2654435761UL;",
        "    time_t end = time(NULL) + atol(argv[1]);",
        f"    while (time(NULL) < end) table[next_rand() % {N_FUNCTIONS}](next_rand() % 24);",
        "    return 0;",
        "}",
    ])


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int, field: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` from /proc/PID/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.harness import Agent, Collector, agent_config

    workdir = Path(tempfile.mkdtemp(prefix="bench-profiler-"))
    load_bin = compile_c(_load_source(), workdir / "stacks_load",
                         "-O1", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer")

    collector = Collector(otelcol_bin(), workdir).start()
    loads = [subprocess.Popen([str(load_bin), str(int(WARMUP_S + MEASURE_S + 60)), str(i)])
             for i in range(2)]
    agent = Agent(workdir, agent_config(collector, {"profiler": {"preset": "development"}}))
    try:
        agent.start()
        assert agent.proc is not None
        pid = agent.proc.pid
        time.sleep(WARMUP_S)
        c0, t0 = _cpu_seconds(pid), time.monotonic()
        samples0 = agent.metric_value("ebpf_receiver_source_events_received_total", source="profiler")
        time.sleep(MEASURE_S)
        c1, t1 = _cpu_seconds(pid), time.monotonic()
        samples1 = agent.metric_value("ebpf_receiver_source_events_received_total", source="profiler")
        lost = {r: agent.metric_value("ebpf_receiver_source_events_lost_total", source="profiler", reason=r)
                for r in ("counts_map_full", "stack_collision", "stack_map_full", "stack_fault",
                          "ringbuf_full")}
        sent = agent.metric_value("ebpf_receiver_exporter_sent_items_total", signal="profiles")
        rss, rss_now = _status_mb(pid, "VmHWM"), _status_mb(pid, "VmRSS")
        rc = agent.stop()
    finally:
        for p in loads:
            p.kill()
            p.wait()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
        collector.stop()
    share = (c1 - c0) / (t1 - t0) * 100
    shutil.rmtree(workdir, ignore_errors=True)

    print(f"profiler: agent at 99 Hz, all processes, 2 cores busy with {N_FUNCTIONS}-function random-depth "
          f"recursion; {t1 - t0:.0f} s measured after {WARMUP_S:.0f} s warm-up")
    print(f"  agent CPU      {c1 - c0:6.2f} s  = {share:.2f} % of one core")
    print(f"  samples drained {samples1 - samples0:6.0f}  ({(samples1 - samples0) / (t1 - t0):.0f}/s); "
          f"profiles sent {sent:.0f}; lost {', '.join(f'{k}={v:.0f}' for k, v in lost.items() if v) or 'none'}")
    print(f"  peak RSS       {rss:6.1f} MB   (BCC compiles with LLVM in-process at start); "
          f"RSS at the end {rss_now:.1f} MB; agent exit code {rc}")
    print(f"bench: profiler cpu_share={share:.2f} %")
    print(f"bench: profiler rss={rss:.1f} MB")
    return 0 if rc == 0 and samples1 > samples0 else 1
