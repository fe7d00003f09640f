"""Nanoseconds added per syscall on a tight getppid loop: (a) no BPF, (b) empty
raw_syscalls sys_enter/sys_exit programs (the floor the tracepoints themselves cost), (c) our
syscall source. Reports (c − a) / (b − a); target ≤ 1.5. Rounds are interleaved (a, then b and
c in alternating order) and each round gives its own ratio; the figure is their median, printed
with min and max of each column, so drift on a shared machine hits all three alike and noise can
be told from a regression. Other processes' BPF programs on syscall tracepoints slow every
variant (even (a)); the benchmark names them when bpftool can. Then bpf_stats rounds time the
programs themselves (empty, ours, ours with a process filter that selects nothing).

Our source keeps a call that does not block in a per-CPU slot and moves it to the thread's
storage only when the thread is switched out (a sched_switch program), so blocking calls and
context switches cost more than the getppid loop shows. A second table measures that: a pipe
ping-pong between two processes on one CPU (4 blocking-capable calls and 2 context switches per
round trip), same three variants.

Smoke mode (``--smoke``): 2 rounds of 200 000 calls and 20 000 round trips, one bpf_stats round;
the same code path (every variant loaded, attached and timed), in about 20 s."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._support import compile_c

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""

EMPTY_BPF = r"""
TRACEPOINT_PROBE(raw_syscalls, sys_enter) { return 0; }
TRACEPOINT_PROBE(raw_syscalls, sys_exit) { return 0; }
"""

PINGPONG_C = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int ab[2], ba[2];
    char c = 0;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    if (pipe(ab) || pipe(ba) || sched_setaffinity(0, sizeof one, &one))
        return 1;
    pid_t child = fork();
    if (child == 0) {
        for (long i = 0; i < n; i++)
            if (read(ab[0], &c, 1) != 1 || write(ba[1], &c, 1) != 1)
                _exit(1);
        _exit(0);
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1)
            return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    waitpid(child, NULL, 0);
    printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""
ROUND_TRIPS = 100_000

CALLS = 2_000_000
ROUNDS = 7
STATS_ROUNDS = 3
# Smoke mode: two rounds (both orders of floor and source), enough calls that the floor stands
# above the noise of a busy runner.
SMOKE = {"calls": 200_000, "rounds": 2, "stats_rounds": 1, "round_trips": 20_000}


def _ns_per_call(binary: Path, n: int) -> float:
    return float(subprocess.run([str(binary), str(n)], capture_output=True, text=True,
                                check=True).stdout)


def run(smoke: bool = False) -> int:
    from bcc import BPF

    from receiver.config import EbpfConfig
    from receiver.export import OtlpGrpcExporter
    from receiver.kernel.clock import KernelClock
    from receiver.kernel.identity import detect_host_attributes
    from receiver.pipeline import Pipeline, ProcessResources
    from receiver.sources.base import SourceContext
    from receiver.sources.syscalls import SyscallsSource
    from receiver.telemetry import SelfTelemetry

    p = SMOKE if smoke else {"calls": CALLS, "rounds": ROUNDS, "stats_rounds": STATS_ROUNDS,
                             "round_trips": ROUND_TRIPS}
    calls, rounds, stats_rounds, round_trips = p["calls"], p["rounds"], p["stats_rounds"], p["round_trips"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-syscalls-"))
    binary = compile_c(LOOP_C, tmp / "loop", "-O2")
    pingpong = compile_c(PINGPONG_C, tmp / "pingpong", "-O2")

    config = EbpfConfig.from_dict({"sources": {"syscalls": {"enabled": True, "slow_spans": True}}},
                                  environ={})
    telemetry = SelfTelemetry()
    # Nothing listens there: the source's output is queued and dropped, which is not measured.
    exporter = OtlpGrpcExporter(config.exporter.__class__(endpoint="http://127.0.0.1:9"), telemetry)
    pipeline = Pipeline(config, exporter, ProcessResources(detect_host_attributes(config.resource)))
    ctx = SourceContext(config, pipeline, telemetry, KernelClock())

    variants = ("none", "empty", "ours")
    loop_ns: dict[str, list[float]] = {k: [] for k in variants}
    pingpong_ns: dict[str, list[float]] = {k: [] for k in variants}

    def both(variant: str) -> None:
        loop_ns[variant].append(_ns_per_call(binary, calls))
        pingpong_ns[variant].append(_ns_per_call(pingpong, round_trips))

    async def floor() -> None:
        empty = BPF(text=EMPTY_BPF)
        await asyncio.to_thread(both, "empty")
        empty.cleanup()

    async def ours(source: SyscallsSource) -> None:
        await source.start()
        await asyncio.to_thread(both, "ours")
        await source.stop()

    async def measure() -> None:
        source = SyscallsSource(ctx)
        for i in range(rounds):
            both("none")
            if i % 2:
                await ours(source)
                await floor()
            else:
                await floor()
                await ours(source)

    # Time inside the programs only (bpf_stats), which load on the shared machine and other
    # processes' programs hardly move: where the added cost is spent, per handler.
    prog_ns: dict[str, dict[str, list[float]]] = {}

    def record(variant: str, handlers: dict[str, float]) -> None:
        for h, ns in handlers.items():
            prog_ns.setdefault(variant, {}).setdefault(h, []).append(ns)

    async def program_time() -> None:
        # With a process filter that selects nothing here: what every unselected call pays.
        filtered_ctx = SourceContext(EbpfConfig.from_dict(
            {"sources": {"syscalls": {"enabled": True, "slow_spans": True,
                                      "filter": {"process_names": ["no-such-process"]}}}}, environ={}),
            pipeline, telemetry, KernelClock())
        with _bpf_stats():
            for _ in range(stats_rounds):
                empty = BPF(text=EMPTY_BPF)
                record("empty", _ns_per_run(_bcc_program_fds(empty), binary, calls))
                empty.cleanup()
                for variant, c in (("ours", ctx), ("ours, filter", filtered_ctx)):
                    source = SyscallsSource(c)
                    await source.start()
                    record(variant, await asyncio.to_thread(_ns_per_run, source.bpf.programs, binary, calls))
                    await source.stop()

    foreign = _foreign_syscall_programs()
    asyncio.run(measure())
    try:
        asyncio.run(program_time())
    except OSError as e:   # BPF_ENABLE_STATS needs kernel 5.8 and CAP_SYS_ADMIN
        print(f"(no per-program time: {e})")
    foreign |= _foreign_syscall_programs()
    a, b, c = (statistics.median(loop_ns[k]) for k in variants)
    pa, pb, pc = (statistics.median(pingpong_ns[k]) for k in variants)
    print(f"syscalls: getppid ns/call, median of {rounds} rounds × {calls} calls")
    print(f"  (a) no BPF            {a:8.1f} ns")
    print(f"  (b) empty programs    {b:8.1f} ns   floor = {b - a:.1f} ns")
    print(f"  (c) syscall source    {c:8.1f} ns   added = {c - a:.1f} ns")
    print(f"pipe ping-pong on one CPU, ns per round trip (4 calls, 2 context switches), "
          f"median of {rounds} rounds × {round_trips}")
    print(f"  (a) no BPF            {pa:8.1f} ns")
    print(f"  (b) empty programs    {pb:8.1f} ns   floor = {pb - pa:.1f} ns")
    blocking = (pc - pa) / (pb - pa) if pb > pa else float("nan")   # nan: no floor above the noise
    print(f"  (c) syscall source    {pc:8.1f} ns   added = {pc - pa:.1f} ns ({blocking:.2f}× the floor)")
    # The spread of the rounds, so noise can be told from a regression: each round's own figures.
    per_round = [(b_i - a_i, c_i - a_i) for a_i, b_i, c_i in zip(*(loop_ns[k] for k in variants))]
    ratios = [added / fl for fl, added in per_round if fl > 0]
    print(f"per round (getppid), min / median / max of {rounds} rounds:")
    print(f"  floor ns added        {_spread([fl for fl, _ in per_round], '.1f')}")
    print(f"  source ns added       {_spread([added for _, added in per_round], '.1f')}")
    left_out = len(per_round) - len(ratios)
    print(f"  source / floor        {_spread(ratios, '.2f')}"
          + (f" ({left_out} round(s) without a floor left out)" if left_out else ""))
    if prog_ns:
        print(f"time inside the programs per run, median of {stats_rounds} rounds (bpf_stats; includes the "
              "stats' own clock reads, as the empty programs show):")
        for variant, handlers in prog_ns.items():
            print(f"  {variant:12s} " + ", ".join(f"{h} {statistics.median(v):.1f} ns" for h, v in handlers.items()))
        # Per round: sys_enter + sys_exit above the empty programs' of the same round.
        above = {v: [e + x - ee - ex for e, x, ee, ex in zip(
            h.get("sys_enter", []), h.get("sys_exit", []),
            prog_ns["empty"]["sys_enter"], prog_ns["empty"]["sys_exit"])]
            for v, h in prog_ns.items() if v != "empty"}
        for variant, figure in (("ours", "program_ns_above_empty"),
                                ("ours, filter", "program_ns_above_empty_filtered")):
            if above.get(variant):
                print(f"  {variant:12s} above empty per call: {_spread(above[variant], '.1f')} ns")
                print(f"bench: syscalls {figure}={statistics.median(above[variant]):.1f} ns")
    if foreign:
        print("note: other processes had BPF programs on syscall tracepoints during the run "
              f"(pid: tracepoints): {'; '.join(f'{pid}: {tps}' for pid, tps in sorted(foreign))}; "
              "every variant pays for them, so the figures are noisier than on an idle machine")
    ratio = statistics.median(ratios) if ratios else float("nan")
    if ratios:
        print(f"bench: syscalls overhead_vs_floor_min={min(ratios):.2f} ratio")
        print(f"bench: syscalls overhead_vs_floor_max={max(ratios):.2f} ratio")
    print(f"bench: syscalls ns_added={c - a:.1f} ns")
    print(f"bench: syscalls floor_ns={b - a:.1f} ns")
    # A ratio without a floor is not a figure: said in words, never printed as a nan bench line.
    if math.isfinite(blocking):
        print(f"bench: syscalls blocking_roundtrip_vs_floor={blocking:.2f} ratio")
    else:
        print("(no blocking_roundtrip_vs_floor: the ping-pong's floor did not stand above the noise)")
    if ratios:
        print(f"bench: syscalls overhead_vs_floor={ratio:.2f} ratio")
    else:
        print("(no overhead_vs_floor: no round's floor stood above the noise)")
    return 0


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "no rounds"
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


@contextlib.contextmanager
def _bpf_stats() -> Iterator[None]:
    """Run-time stats for all BPF programs while the block runs: ``BPF_ENABLE_STATS`` holds them
    on by a file descriptor, so the sysctl and other users of it are left alone."""
    libc = ctypes.CDLL(None, use_errno=True)
    nr_bpf = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
    attr = (ctypes.c_uint32 * 32)()   # union bpf_attr: enable_stats.type = BPF_STATS_RUN_TIME (0)
    fd = libc.syscall(nr_bpf, 32, ctypes.byref(attr), ctypes.sizeof(attr))   # BPF_ENABLE_STATS
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


def _bcc_program_fds(bpf: Any) -> dict[str, int]:
    """Program name → descriptor of a ``bcc.BPF`` loaded in this process (the empty programs).
    The source's programs come from its loader process, held by a ``libbpf.BpfObject`` whose
    ``programs`` is already that mapping."""
    return {name.decode(): fn.fd for name, fn in bpf.funcs.items()}


def _ns_per_run(programs: dict[str, int], binary: Path, calls: int) -> dict[str, float]:
    """Mean run time of each program (name → descriptor) over one getppid loop, from its fdinfo;
    handlers by their short name (``tracepoint__raw_syscalls__sys_enter`` → ``sys_enter``)."""
    def counters() -> dict[str, tuple[int, int]]:
        out = {}
        for name, fd in programs.items():
            info = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                        if ":" in line)
            short = name.rsplit("__", 1)[-1]
            out[short] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
        return out

    before = counters()
    _ns_per_call(binary, calls)
    after = counters()
    return {h: (t - before[h][1]) / (n - before[h][0]) for h, (n, t) in after.items() if n > before[h][0]}


def _foreign_syscall_programs() -> set[tuple[int, str]]:
    """Other processes' BPF programs on syscall tracepoints (they slow every variant), by
    ``bpftool perf show``; empty without bpftool."""
    bpftool = shutil.which("bpftool")
    if not bpftool:
        return set()
    out = subprocess.run([bpftool, "-j", "perf", "show"], capture_output=True, text=True)
    try:
        rows = json.loads(out.stdout or "[]")
    except ValueError:
        return set()
    by_pid: dict[int, set[str]] = {}
    for r in rows:
        tp = str(r.get("tracepoint", ""))
        if r.get("pid") != os.getpid() and tp.startswith(("sys_enter", "sys_exit")):
            by_pid.setdefault(int(r["pid"]), set()).add(tp)
    return {(pid, ",".join(sorted(tps))) for pid, tps in by_pid.items()}
