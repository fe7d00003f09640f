"""Soak: the agent with all four sources (process, network, syscalls, profiler) for
``SOAK_MINUTES`` (default 10) against a churning host, exporting to the real Collector, to show
that its memory stops growing once its caches are full.

Every second the load makes 20 short-lived processes (fork + exec of /bin/true), 50 TCP
connections on loopback, and every ``NEW_BINARY_EVERY`` seconds links a new binary (same code, a
new build id, a new path) and runs it on the CPU for 0.2 s, so the profiler notes a new process,
symbolizes a new file and builds its unwind tables; every 10 s a short CPython process does the
same for the Python frames.

Prints, besides the RSS curve and the cache gauges at the end (to attribute growth):
  rss_peak_mb     the agent's VmHWM at the end
  rss_end_mb      VmRSS at the end
  rss_growth_pct  (RSS at the end - RSS at minute 2) / RSS at minute 2 x 100, where minutes
                  count from the moment all four sources were up, RSS at minute 2 is the median
                  of the VmRSS samples (every 5 s) from minute 1.5 to 2.5 and RSS at the end the
                  median of the last minute's samples: a median, so that one drain or export
                  batch in flight does not decide it (for runs shorter than 4 minutes the
                  baseline is the middle of the run)
  startup_s       from launching the agent to all four ``ebpf_receiver_source_up`` being 1

Smoke mode (``--smoke``): the same agent and churn for 15 s (``SOAK_MINUTES`` is ignored), RSS
sampled every second; the growth's baseline is then the middle of the run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ._support import compile_c, discarding_collector_yaml, otelcol_bin

MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))
SAMPLE_EVERY = 5.0               # seconds between RSS samples
SMOKE_MINUTES, SMOKE_SAMPLE_EVERY = 0.25, 1.0
EXECS_PER_S = 20
CONNECTIONS_PER_S = 50
NEW_BINARY_EVERY = 2.0           # seconds
PYTHON_EVERY = 10.0
SOURCES = ("process", "network", "syscalls", "profiler")

# Spins on the CPU for argv[1] ms in a few distinct functions (no frame pointers: the unwinder
# walks it with the tables it builds from .eh_frame).
SPIN_C = r"""
#include <stdlib.h>
#include <time.h>
static volatile unsigned long sink;
__attribute__((noinline)) static void leaf(int n) { for (int i = 0; i < n; i++) sink += i * 7; }
__attribute__((noinline)) static void mid(int n) { leaf(n); sink ^= 1; }
__attribute__((noinline)) static void top(int n) { mid(n); sink += 3; }
int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 200;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        top(20000);
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < ms);
    return 0;
}
"""

# SOAK_TRACEMALLOC=1: the agent traces its Python allocations and writes the 25 lines that grew
# most since minute 2 to tracemalloc.txt in the work directory, every minute (slower; to attribute
# growth, not to measure it).
TRACEMALLOC = os.environ.get("SOAK_TRACEMALLOC") == "1"
SITECUSTOMIZE = """
import os, threading, time, tracemalloc
tracemalloc.start(4)
def _dump():
    time.sleep(120)
    base = tracemalloc.take_snapshot()
    while True:
        time.sleep(60)
        top = tracemalloc.take_snapshot().compare_to(base, "traceback")[:25]
        with open(os.environ["SOAK_TRACEMALLOC_OUT"], "w") as f:
            for stat in top:
                f.write(f"{stat.size_diff / 1024:10.1f} KiB {stat.count_diff:+8d}\\n")
                for line in stat.traceback.format()[-8:]:
                    f.write(f"        {line}\\n")
threading.Thread(target=_dump, daemon=True, name="soak-tracemalloc").start()
"""

PYTHON_SPIN = ("import time\n"
               "def f(n):\n    return sum(i * i for i in range(n))\n"
               "t = time.monotonic()\n"
               "while time.monotonic() - t < 0.3:\n    f(10000)\n")


def _median(values: list[int]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def _families(text: str) -> dict[str, dict[str, float]]:
    """metric name → {its cache, source, signal and reason labels joined by "/" → value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            label = "/".join(s.labels[k] for k in ("cache", "source", "signal", "reason") if k in s.labels)
            out.setdefault(s.name, {})[label] = out.setdefault(s.name, {}).get(label, 0) + s.value
    return out


def _metrics(port: int) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return _families(r.read().decode())


class Load:
    """The churn, in a thread of this process (its own children do the work)."""

    def __init__(self, workdir: Path, spin_object: Path):
        self.workdir = workdir
        self.spin_object = spin_object
        self.stop = threading.Event()
        self.counts = {"execs": 0, "connections": 0, "binaries": 0, "python": 0}
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                conn.sendall(b"x" * 64)
            except OSError:
                pass
            conn.close()

    def _new_binary(self, n: int) -> None:
        path = self.workdir / f"spin{n}"
        build_id = f"0x{n:08x}{os.getpid():08x}5eed5eed5eed5eed5eed5eed"
        subprocess.run(["gcc", "-o", str(path), str(self.spin_object), f"-Wl,--build-id={build_id}"],
                       check=True)
        subprocess.run([str(path), "200"], check=True)
        path.unlink()
        self.counts["binaries"] += 1

    def run(self) -> None:
        self._accepter.start()
        next_binary = next_python = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            procs = [subprocess.Popen(["/bin/true"]) for _ in range(EXECS_PER_S)]
            for p in procs:
                p.wait()
            self.counts["execs"] += len(procs)
            for _ in range(CONNECTIONS_PER_S):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
                        c.sendall(b"y" * 32)
                        c.recv(64)
                except OSError:
                    if self.stop.is_set():
                        return    # the listener closed under us at the end
                    raise
                self.counts["connections"] += 1
            if t0 >= next_binary:
                self._new_binary(self.counts["binaries"])
                next_binary = t0 + NEW_BINARY_EVERY
            if t0 >= next_python:
                subprocess.run([sys.executable, "-c", PYTHON_SPIN], check=True)
                self.counts["python"] += 1
                next_python = t0 + PYTHON_EVERY
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def run(smoke: bool = False) -> int:
    from tests.harness import Agent, Collector

    minutes, sample_every = (SMOKE_MINUTES, SMOKE_SAMPLE_EVERY) if smoke else (MINUTES, SAMPLE_EVERY)
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    spin_object = workdir / "spin.o"
    compile_c(SPIN_C, workdir / "spin-check", "-O2", "-fomit-frame-pointer")   # compiles at all
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-c", "-o", str(spin_object),
                    str(workdir / "spin-check.c")], check=True)
    (workdir / "otelcol.yaml").write_text(discarding_collector_yaml(("traces", "metrics", "logs", "profiles")))
    collector = Collector(otelcol_bin(), workdir, config=workdir / "otelcol.yaml").start()
    config = {"exporter": {"endpoint": collector.endpoint},
              "sources": {name: {"enabled": True} for name in SOURCES}}
    env = {}
    if TRACEMALLOC:
        (workdir / "site").mkdir()
        (workdir / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {"PYTHONPATH": str(workdir / "site"), "SOAK_TRACEMALLOC_OUT": str(workdir / "tracemalloc.txt")}
    agent = Agent(workdir, config, env=env)
    load = Load(workdir, spin_object)
    loader = threading.Thread(target=load.run, name="soak-load", daemon=True)
    samples: list[tuple[float, int]] = []   # (seconds since all sources up, VmRSS kB)
    rc = 1
    try:
        launched = time.monotonic()
        agent.start(wait_ready=False)
        assert agent.proc is not None
        pid = agent.proc.pid
        while True:
            if agent.proc.poll() is not None:
                raise AssertionError(f"agent exited {agent.proc.returncode}: {agent.log()[-3000:]}")
            try:
                up = _metrics(agent.metrics_port).get("ebpf_receiver_source_up", {})
            except OSError:
                up = {}
            if all(up.get(s) == 1 for s in SOURCES):
                break
            if time.monotonic() - launched > 180:
                raise AssertionError(f"sources not all up after 180 s: {up}; {agent.log()[-3000:]}")
            time.sleep(0.1)
        startup = time.monotonic() - launched
        print(f"soak: all four sources up after {startup:.2f} s; load for {minutes:g} min", flush=True)
        loader.start()
        t_up = time.monotonic()
        end = t_up + minutes * 60
        while time.monotonic() < end:
            rss = _status(pid)["VmRSS"]
            t = time.monotonic() - t_up
            samples.append((t, rss))
            if len(samples) % round(60 / sample_every) == 1:
                print(f"  t={t:6.0f} s  rss={rss / 1024:7.1f} MB  load={load.counts}", flush=True)
            time.sleep(sample_every)
        load.close()
        loader.join(30)
        status = _status(pid)
        samples.append((time.monotonic() - t_up, status["VmRSS"]))
        final = _metrics(agent.metrics_port)
        rc = 0
    finally:
        load.close()
        stop_rc = agent.stop() if agent.proc is not None else 1
        collector.stop()
    baseline_at = 120.0 if minutes >= 4 else minutes * 30
    base_rss = _median([rss for t, rss in samples if abs(t - baseline_at) <= 30])
    last = samples[-1][0]
    end_rss = _median([rss for t, rss in samples if t >= last - 60])
    growth = (end_rss - base_rss) / base_rss * 100
    entries = final.get("ebpf_receiver_cache_entries", {})
    limits = final.get("ebpf_receiver_cache_limit_entries", {})
    evicted = final.get("ebpf_receiver_cache_evictions_total", {})
    print(f"soak: load made {load.counts}")
    print("soak: caches at the end (entries / limit, evictions):")
    for name in sorted(entries):
        print(f"  {name:26s} {entries[name]:8.0f} / {limits.get(name, 0):8.0f}  {evicted.get(name, 0):10.0f}")
    lost = final.get("ebpf_receiver_source_events_lost_total", {})
    dropped = final.get("ebpf_receiver_exporter_dropped_items_total", {})
    sent = final.get("ebpf_receiver_exporter_sent_items_total", {})
    print(f"soak: sent {sent}; lost in the kernel {({k: v for k, v in lost.items() if v} or 'none')}; "
          f"dropped by the exporter {({k: v for k, v in dropped.items() if v} or 'none')}")
    print(f"soak: median VmRSS {base_rss / 1024:.1f} MB at t={baseline_at:.0f}±30 s, {end_rss / 1024:.1f} MB "
          f"over the last minute (t={last - 60:.0f} to {last:.0f} s); single samples then: "
          f"{min(samples, key=lambda s: abs(s[0] - baseline_at))[1] / 1024:.1f} and {samples[-1][1] / 1024:.1f} MB")
    print(f"bench: soak rss_peak_mb={status['VmHWM'] / 1024:.1f} MB")
    print(f"bench: soak rss_end_mb={end_rss / 1024:.1f} MB")
    print(f"bench: soak rss_growth_pct={growth:.2f} %")
    print(f"bench: soak startup_s={startup:.2f} s")
    if TRACEMALLOC and (workdir / "tracemalloc.txt").exists():
        print("soak: Python allocations grown since minute 2 (tracemalloc):")
        print((workdir / "tracemalloc.txt").read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if rc == 0 and stop_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(run())
