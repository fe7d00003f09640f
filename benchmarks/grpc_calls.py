"""gRPC unary calls under load (the HTTP/2 part of ``make bench BENCH=http``): a grpcio server
and a grpcio client, each its own process, on loopback; the client's threads make unary calls on
one channel for a fixed time (``BENCH_GRPC_SECONDS``, 6), first without the agent, then with it
(a real ``ebpf-otlp-receiver run`` with only the http source, filtered to the server's port,
exporting to a real Collector that discards), then without it again, ``BENCH_GRPC_ROUNDS`` (3)
times: every run with the agent lies between two without it.

Reports:
- ``grpc_calls_ratio``: the median over the rounds of calls/s with the agent over the mean of
  the runs without it on either side (goal >= 0.95);
- ``grpc_spans_per_call``: spans the Collector accepted over 2 × calls (a SERVER and a CLIENT
  span per call; goal 1.00);
- ``grpc_bpf_ns_per_call``: time inside the agent's BPF programs over the calls made (run-time
  stats on for the run; other processes' read/write calls count too);
- ``grpc_agent_cpu_us_per_call``: the agent's CPU time (user + system) until it has handled the
  run, over the calls made;
- ``grpc_records_per_call``: records the kernel sent the agent per call (both sides);
- ``grpc_agent_cpu_per_app_cpu``: the agent's CPU time over the client's and server's during
  the run with it (how much CPU the agent adds to the calls' own; unlike the ratio, it hardly
  depends on what else the machine runs);
- ``grpc_load_average``: the highest 1-minute load average at the end of a run with the agent
  (the ratio means little on a machine busier than its cores).

Smoke mode: one round of 2 s phases with 2 threads; the same processes and figures, proving the
path."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._support import discarding_collector_yaml, otelcol_bin
from .network import _cpu_seconds, _scrape_sum

SECONDS = int(os.environ.get("BENCH_GRPC_SECONDS", "6"))
ROUNDS = int(os.environ.get("BENCH_GRPC_ROUNDS", "3"))
THREADS = int(os.environ.get("BENCH_GRPC_THREADS", "4"))
SMOKE_SECONDS, SMOKE_THREADS = 2, 2
COLLECTOR_YAML = discarding_collector_yaml(("traces", "metrics"), metrics_port_env="OTELCOL_METRICS_PORT")

SERVER = """
import sys, grpc
from concurrent.futures import ThreadPoolExecutor
server = grpc.server(ThreadPoolExecutor(max_workers=8))
handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler}),))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop(None)
"""

CLIENT = """
import sys, threading, time, grpc
port, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
with grpc.insecure_channel("127.0.0.1:" + port) as channel:
    call = channel.unary_unary("/bench.Echo/Call")
    call(b"warm", timeout=10)
    counts = [0] * threads
    end = time.monotonic() + seconds
    def work(i):
        while time.monotonic() < end:
            call(b"x" * 32, timeout=10)
            counts[i] += 1
    t0 = time.monotonic()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    print(sum(counts), time.monotonic() - t0, time.process_time())
"""


def http_agent_config(endpoint: str, port: int) -> dict[str, Any]:
    """The agent of the HTTP benchmarks: only the http source, filtered to ``port``."""
    return {"exporter": {"endpoint": endpoint, "queue_size": 200_000, "max_batch_size": 4096},
            "sources": {"process": {"enabled": False}, "profiler": {"enabled": False},
                        "syscalls": {"enabled": False}, "network": {"enabled": False},
                        "http": {"enabled": True, "ports": [port], "report_interval": "2s",
                                 "ring_buffer_pages": 4096}}}


def _load(port: int, seconds: float, threads: int) -> tuple[int, float, float]:
    """(calls, seconds, the client's CPU seconds) of one client run."""
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(seconds), str(threads)], capture_output=True,
                         text=True, check=True, timeout=seconds + 60).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def run(smoke: bool = False) -> int:
    from tests.harness import Agent, Collector, free_port, wait_until

    from .http import _bpf_stats, _program_run_ns  # (http.py imports this module)

    seconds, threads = (SMOKE_SECONDS, SMOKE_THREADS) if smoke else (SECONDS, THREADS)
    rounds = 1 if smoke else ROUNDS
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    (workdir / "otelcol.yaml").write_text(COLLECTOR_YAML)
    col_metrics_port = free_port()
    collector = Collector(otelcol_bin(), workdir, config=workdir / "otelcol.yaml")
    agent = None
    rc = 0
    withouts: list[float] = []   # calls/s of each run without the agent
    withs: list[float] = []
    calls = spans = expected = records = 0.0
    ns = runs = cpu = app_cpu = 0.0
    loads: list[float] = []
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        collector.start(extra_env={"OTELCOL_METRICS_PORT": str(col_metrics_port)})
        col_url = f"http://127.0.0.1:{col_metrics_port}/metrics"
        _load(port, 1, threads)   # warm-up
        n, t, _ = _load(port, seconds, threads)
        withouts.append(n / t)
        for _round in range(rounds):   # with, then without the agent: each with-run between two without
            agent = Agent(workdir, http_agent_config(collector.endpoint, port)).start()
            assert agent.proc is not None
            spans0 = _scrape_sum(col_url, "otelcol_receiver_accepted_spans_total")
            records0 = agent.metric_value("ebpf_receiver_source_events_received_total", source="http")
            with _bpf_stats():
                ns0, cpu0 = _program_run_ns(agent.proc.pid), _cpu_seconds(agent.proc.pid)
                server_cpu0 = _cpu_seconds(server.pid)
                n, t, client_cpu = _load(port, seconds, threads)
                app_cpu += _cpu_seconds(server.pid) - server_cpu0 + client_cpu
                ns1 = _program_run_ns(agent.proc.pid)
                loads.append(os.getloadavg()[0])
                want = 2 * (n + 1)   # + the client's warm-up call
                with contextlib.suppress(AssertionError):
                    wait_until(lambda want=want, spans0=spans0: _scrape_sum(
                        col_url, "otelcol_receiver_accepted_spans_total") - spans0 >= want, 30, 0.5,
                        "every span at the Collector")
                cpu += _cpu_seconds(agent.proc.pid) - cpu0
            withs.append(n / t)
            calls += n
            expected += want
            ns += ns1[0] - ns0[0]
            runs += ns1[1] - ns0[1]
            spans += _scrape_sum(col_url, "otelcol_receiver_accepted_spans_total") - spans0
            records += agent.metric_value("ebpf_receiver_source_events_received_total", source="http") - records0
            rc = agent.stop() or rc
            agent = None
            n, t, _ = _load(port, seconds, threads)
            withouts.append(n / t)
    finally:
        if agent is not None:
            agent.stop()
        if server.stdin is not None:
            server.stdin.close()
        server.wait(20)
        if server.stdout is not None:
            server.stdout.close()
        collector.stop()
    ratios = [w / ((withouts[i] + withouts[i + 1]) / 2) for i, w in enumerate(withs)]
    ratio = statistics.median(ratios)
    load = max(loads)
    print(f"grpc: {threads} threads of unary calls on one channel, {rounds} rounds of {seconds} s without and with "
          f"the agent: {' '.join(f'{c:.0f}' for c in withouts)} calls/s without it, "
          f"{' '.join(f'{c:.0f}' for c in withs)} with it (ratios {' '.join(f'{r:.3f}' for r in ratios)}); "
          f"{int(spans)} spans accepted of {int(expected)}")
    per = max(calls, 1)
    print(f"  with the agent: BPF {ns / 1e6:.1f} ms in {runs / per:.1f} program runs per call, {records / per:.1f} "
          f"records per call, agent CPU {cpu:.2f} s (client and server {app_cpu:.2f} s); load average "
          f"{' '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} CPUs")
    print(f"bench: http grpc_calls_ratio={ratio:.3f} ratio")
    print(f"bench: http grpc_spans_per_call={spans / max(expected, 1):.3f} ratio")
    print(f"bench: http grpc_bpf_ns_per_call={ns / per:.0f} ns")
    print(f"bench: http grpc_agent_cpu_us_per_call={cpu / per * 1e6:.1f} us")
    print(f"bench: http grpc_records_per_call={records / per:.2f} records")
    print(f"bench: http grpc_agent_cpu_per_app_cpu={cpu / max(app_cpu, 1e-9):.3f} ratio")
    print(f"bench: http grpc_load_average={load:.1f} load")
    if smoke and (calls == 0 or spans == 0):
        print("grpc: smoke run produced no calls or no spans", file=sys.stderr)
        return 1
    return rc

if __name__ == "__main__":
    sys.exit(run())
