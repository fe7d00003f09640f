"""Off-CPU profiling's cost and accuracy on a context-switch-heavy load.

The load: pairs of threads ping-ponging one byte over two pipes (every round trip is two
blocking reads, two wake-ups and at least two context switches per thread pair), run for a fixed
time; it prints its round trips and, per ping-pong thread, its off-CPU time as the kernel keeps
it: wall time minus the thread's CPU time (``CLOCK_THREAD_CPUTIME_ID``).

Rounds alternate two agents' profilers, each loaded fresh: without off-CPU time (the profiler at
its defaults) and with it (``off_cpu.enabled`` at the other defaults). Figures:

- ``throughput_ratio``: median over rounds of round trips per CPU second with ÷ without (goal
  ≥ 0.95). The load runs on one CPU and is measured by its own CPU time (user + system, which
  holds the BPF programs: they run in the switching thread's context): on a shared 2-core VM
  wall-clock throughput varies several-fold with other work, far more than the effect measured;
- ``estimate_error``: |reported − measured| ÷ measured off-CPU time of the ping-pong threads,
  reported being the off-CPU nanoseconds of their samples (scaled by 1 / sample_probability);
- ``recorded_per_switch``: switch-outs whose stacks were taken ÷ all seen (the sampling share);
- in a full run, ``throughput_ratio_every_switch``: the same ratio with sample_probability 1.

Smoke mode (``--smoke``): one round of 1 s each, without waiting for the load's unwind tables;
the same code path otherwise."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ._support import compile_c

PINGPONG_C = r"""
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double run_s;
static pthread_barrier_t ready;
struct side { int in, out; long trips; long tid; double off_s; int first; };

static double now(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static void *pingpong(void *arg) {
    struct side *s = arg;
    char b = 'x';
    s->tid = syscall(SYS_gettid);
    /* from the thread's start: every off-CPU moment of the thread is in both figures */
    double t0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_THREAD_CPUTIME_ID);
    pthread_barrier_wait(&ready);
    double stop = now(CLOCK_MONOTONIC) + run_s;
    if (s->first && write(s->out, &b, 1) != 1) exit(1);
    for (;;) {
        if (read(s->in, &b, 1) != 1) break;
        if (b == 'q') { if (!s->first) write(s->out, &b, 1); break; }
        s->trips++;
        if (s->first && now(CLOCK_MONOTONIC) >= stop) b = 'q';
        if (write(s->out, &b, 1) != 1) break;
        if (b == 'q') { read(s->in, &b, 1); break; }
    }
    s->off_s = (now(CLOCK_MONOTONIC) - t0) - (now(CLOCK_THREAD_CPUTIME_ID) - c0);
    return NULL;
}

int main(int argc, char **argv) {
    int pairs = atoi(argv[1]);
    run_s = atof(argv[2]);
    struct side *sides = calloc(2 * pairs, sizeof(*sides));
    pthread_t *th = calloc(2 * pairs, sizeof(*th));
    for (int p = 0; p < pairs; p++) {
        int ab[2], ba[2];
        if (pipe(ab) || pipe(ba)) return 1;
        sides[2 * p] = (struct side){.in = ba[0], .out = ab[1], .first = 1};
        sides[2 * p + 1] = (struct side){.in = ab[0], .out = ba[1], .first = 0};
    }
    /* wait for "go" in 50 ms steps: each one a switch-out, so the profiler notices the process
     * and loads its unwind tables before the load starts */
    struct pollfd in = {.fd = 0, .events = POLLIN};
    while (poll(&in, 1, 50) == 0) ;
    char line[8];
    if (!fgets(line, sizeof(line), stdin)) return 1;
    pthread_barrier_init(&ready, NULL, 2 * pairs);
    for (int i = 0; i < 2 * pairs; i++) pthread_create(&th[i], NULL, pingpong, &sides[i]);
    long trips = 0;
    double off = 0;
    for (int i = 0; i < 2 * pairs; i++) {
        pthread_join(th[i], NULL);
        if (sides[i].first) trips += sides[i].trips;
        off += sides[i].off_s;
    }
    printf("%ld %.9f", trips, off);
    for (int i = 0; i < 2 * pairs; i++) printf(" %ld", sides[i].tid);
    printf("\n");
    return 0;
}
"""

PAIRS = 2
FULL = {"rounds": 3, "seconds": 4.0}
SMOKE = {"rounds": 1, "seconds": 1.0}


class _Profiler:
    """One agent's profiler (a ``CpuSampler``), its ring buffer read in one thread and its maps
    drained every second in another, as the agent does (its event loop reads the ring buffer
    while a worker thread drains)."""

    def __init__(self, off_cpu: dict[str, Any] | None) -> None:
        from receiver.config import EbpfConfig
        from receiver.profiling.sampler import CpuSampler

        section: dict[str, Any] = {"report_interval": "1s"}
        if off_cpu is not None:
            section["off_cpu"] = off_cpu
        config = EbpfConfig.from_dict({"sources": {"profiler": section}}, environ={}).sources.profiler
        self.sampler = CpuSampler(config)
        self.sampler.bind(self.sampler.load())
        self.sampler.bpf["events"].open_ring_buffer(lambda _c, data, _s: self.sampler.on_record(data))
        self.off_cpu_samples: list[Any] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, daemon=True),
                         threading.Thread(target=self._drain, daemon=True)]
        for t in self._threads:
            t.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sampler.bpf.ring_buffer_poll(100)

    def _drain(self) -> None:
        while not self._stop.wait(1.0):
            self._keep(self.sampler.drain())

    def _keep(self, profile: Any) -> None:
        if profile.off_cpu is not None:
            self.off_cpu_samples += profile.off_cpu.samples

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.sampler.detach()
        self.sampler.bpf.ring_buffer_consume()
        self._keep(self.sampler.drain())
        self.stats = self.sampler.offcpu_stats()
        if self.stats:
            from receiver.profiling.abi import LOST_REASONS
            self.stats["lost_map_full"] = self.sampler.lost_totals()[LOST_REASONS.index("offcpu_map_full")]
        self.sampler.close()


def _has_key(table: Any, pid: int) -> bool:
    try:
        table[table.Key(pid)]
    except KeyError:
        return False
    return True


def _load(binary: Path, seconds: float, prof: _Profiler | None = None) -> tuple[int, float, float, set[int]]:
    """Runs the ping-pong on CPU 0 (once ``prof`` has its unwind tables, as for a service that
    has been running): its pid, round trips per CPU second it used (its own CPU time, user and
    system: the BPF programs run in the switching thread's context, so they are in it, and other
    load on the machine is not), its threads' off-CPU seconds and their ids."""
    proc = subprocess.Popen([str(binary), str(PAIRS), str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert proc.stdout is not None and proc.stdin is not None
    if prof is not None and prof.sampler.unwinder is not None:
        table = prof.sampler.bpf["unwind_processes"]
        deadline = time.monotonic() + 120
        while not _has_key(table, proc.pid):
            if time.monotonic() > deadline:
                print("  (its unwind tables did not load in 120 s: frame-pointer stacks)", flush=True)
                break
            time.sleep(0.2)
    proc.stdin.write("go\n")
    proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"the ping-pong load failed: {proc.returncode}")
    trips, off, *tids = out.split()
    return proc.pid, int(trips) / (usage.ru_utime + usage.ru_stime), float(off), {int(t) for t in tids}


def _with_profiler(binary: Path, seconds: float, off_cpu: dict[str, Any] | None,
                   wait_tables: bool = True) -> tuple[float, float, float, dict[str, int]]:
    """Round trips/s under a profiler; with off_cpu also reported ÷ measured off-CPU time."""
    prof = _Profiler(off_cpu)
    try:
        pid, rate, measured, tids = _load(binary, seconds, prof if wait_tables else None)
    finally:
        prof.close()
    reported = sum(s.count for s in prof.off_cpu_samples if s.pid == pid and s.tid in tids) / 1e9
    return rate, reported, measured, getattr(prof, "stats", {})


def run(smoke: bool = False) -> int:
    from receiver.config.schema import OffCpuConfig

    p = SMOKE if smoke else FULL
    rounds, seconds = int(p["rounds"]), float(p["seconds"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-offcpu-"))
    binary = compile_c(PINGPONG_C, tmp / "pingpong", "-O2", "-pthread")
    defaults = OffCpuConfig()
    on = {"enabled": True}
    print(f"offcpu: {PAIRS} ping-pong pairs, {rounds} rounds of {seconds:g}s per variant; off_cpu defaults: "
          f"sample_probability={defaults.sample_probability}, min_block={defaults.min_block}s", flush=True)
    ratios, errors, every = [], [], []
    shares: list[float] = []
    for r in range(rounds):
        base, *_ = _with_profiler(binary, seconds, None)
        rate, reported, measured, stats = _with_profiler(binary, seconds, on, wait_tables=not smoke)
        ratios.append(rate / base)
        errors.append(abs(reported - measured) / measured)
        seen = stats.get("recorded", 0) + stats.get("unsampled", 0)
        shares.append(stats.get("recorded", 0) / seen if seen else 0.0)
        line = (f"  round {r + 1}: {base:,.0f} round trips per CPU s without, {rate:,.0f} with off-CPU "
                f"(ratio {rate / base:.3f}); off-CPU {reported:.3f}s reported vs {measured:.3f}s measured "
                f"({stats.get('recorded', 0)} switch-outs recorded, {stats.get('lost_map_full', 0)} blocks "
                "lost to a full offcpu map, all processes)")
        if not smoke:
            all_rate, *_ = _with_profiler(binary, seconds, {"enabled": True, "sample_probability": 1.0})
            every.append(all_rate / base)
            line += f"; every switch: ratio {all_rate / base:.3f}"
        print(line, flush=True)
    print(f"bench: offcpu throughput_ratio={statistics.median(ratios):.3f} ratio")
    print(f"bench: offcpu estimate_error={statistics.median(errors):.4f} fraction")
    print(f"bench: offcpu recorded_per_switch={statistics.median(shares):.3f} fraction")
    if every:
        print(f"bench: offcpu throughput_ratio_every_switch={statistics.median(every):.3f} ratio")
    return 0
