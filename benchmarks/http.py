"""HTTP requests under load: wrk (keep-alive, Debian's package) against nginx on loopback, first
without the agent, then with the agent (a real ``ebpf-otlp-receiver run`` with only the http
source, filtered to nginx's port, exporting to a real Collector that discards), then without it
again; the same run, the same load.

Reports:
- ``throughput_ratio``: requests/s with the agent over the mean of the two runs without it
  (goal >= 0.95);
- ``bpf_ns_per_request``: time inside the agent's BPF programs (``run_time_ns`` of each
  program, from the agent's descriptors, with run-time stats enabled by ``BPF_ENABLE_STATS``
  for the duration) over the requests wrk made (goal <= 500 ns). The programs run on every
  read/write-family call of every process, so other work on the machine adds to it;
- ``spans_per_request``: spans the Collector accepted over 2 × requests (each request is a
  SERVER span in nginx and a CLIENT span in wrk; goal 1.00: nothing lost);
- ``agent_cpu_per_10k_rps``: the agent's CPU time during the run with it, in % of one core, per
  10 000 requests/s (goal <= 50).

Smoke mode (``--smoke``): 2 s phases with 2 connections; the same programs, agent, Collector
and figures, proving the path (not the numbers)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._support import discarding_collector_yaml, otelcol_bin
from .grpc_calls import http_agent_config
from .grpc_calls import run as grpc_calls
from .network import _cpu_seconds, _scrape_sum

SECONDS = int(os.environ.get("BENCH_HTTP_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_HTTP_CONNECTIONS", "8"))
SMOKE_SECONDS, SMOKE_CONNECTIONS = 2, 2

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
COLLECTOR_YAML = discarding_collector_yaml(("traces", "metrics"), metrics_port_env="OTELCOL_METRICS_PORT")
_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(m?s)")


def _wrk(port: int, seconds: int, connections: int) -> tuple[int, float]:
    """(requests, seconds) of one wrk run."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/bench"],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    m = _REQUESTS.search(out)
    if m is None:
        raise RuntimeError(f"cannot read wrk's output: {out}")
    elapsed = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    return int(m.group(1)), elapsed


@contextlib.contextmanager
def _bpf_stats() -> Iterator[None]:
    """BPF run-time stats on while the block runs (``BPF_ENABLE_STATS``, held by a descriptor)."""
    libc = ctypes.CDLL(None, use_errno=True)
    nr_bpf = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
    attr = (ctypes.c_uint32 * 32)()
    fd = libc.syscall(nr_bpf, 32, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


def _program_run_ns(pid: int) -> tuple[int, int]:
    """Sums of ``run_time_ns`` and ``run_cnt`` over the BPF programs process ``pid`` holds (its
    fdinfo)."""
    total = runs = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if "prog_tag:" not in text:
            continue
        for line in text.splitlines():
            if line.startswith("run_time_ns:"):
                total += int(line.split(":", 1)[1])
            elif line.startswith("run_cnt:"):
                runs += int(line.split(":", 1)[1])
    return total, runs


def _nonzero(counts: dict[str, float]) -> str:
    return ", ".join(f"{k} {int(v)}" for k, v in counts.items() if v) or "none"


def run(smoke: bool = False) -> int:
    from tests.harness import Agent, Collector, free_port, wait_until

    seconds, connections = (SMOKE_SECONDS, SMOKE_CONNECTIONS) if smoke else (SECONDS, CONNECTIONS)
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx_bin) or shutil.which("wrk") is None:
        print("http: needs nginx and wrk (apt-get install nginx-light wrk)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    port = free_port()
    (workdir / "nginx.conf").write_text(NGINX_CONF.format(tmp=workdir, port=port))
    nginx = subprocess.Popen([nginx_bin, "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "nginx-error.log")],
                             stdin=subprocess.DEVNULL)
    (workdir / "otelcol.yaml").write_text(COLLECTOR_YAML)
    col_metrics_port = free_port()
    collector = Collector(otelcol_bin(), workdir, config=workdir / "otelcol.yaml")
    agent = None
    rc = 0
    try:
        collector.start(extra_env={"OTELCOL_METRICS_PORT": str(col_metrics_port)})
        col_url = f"http://127.0.0.1:{col_metrics_port}/metrics"
        time.sleep(0.5)
        _wrk(port, 1, connections)   # warm-up
        before = _wrk(port, seconds, connections)
        agent = Agent(workdir, http_agent_config(collector.endpoint, port)).start()
        assert agent.proc is not None
        spans0 = _scrape_sum(col_url, "otelcol_receiver_accepted_spans_total")
        with _bpf_stats():
            ns0, cpu0 = _program_run_ns(agent.proc.pid), _cpu_seconds(agent.proc.pid)
            t0 = time.monotonic()
            with_agent = _wrk(port, seconds, connections)
            ns1 = _program_run_ns(agent.proc.pid)
            # the agent's CPU until it has handled what the run sent (or 30 s)
            expected = 2 * with_agent[0]
            with contextlib.suppress(AssertionError):
                wait_until(lambda: _scrape_sum(col_url, "otelcol_receiver_accepted_spans_total") - spans0
                           >= expected, 30, 0.5, "every span at the Collector")
            cpu = _cpu_seconds(agent.proc.pid) - cpu0
            busy = time.monotonic() - t0
        spans = _scrape_sum(col_url, "otelcol_receiver_accepted_spans_total") - spans0
        lost = agent.metric_value("ebpf_receiver_source_events_lost_total", source="http")
        # where spans went missing: records lost in the kernel by reason, and what the parser
        # could not pair (lost_data: a connection resynchronised after a lost record)
        lost_by = {r: agent.metric_value("ebpf_receiver_source_events_lost_total", source="http", reason=r)
                   for r in ("ringbuf_full", "call_map_full", "tls_no_socket", "decode_error")}
        unparsed_by = {r: agent.metric_value("ebpf_receiver_http_unparsed_total", reason=r)
                       for r in ("lost_data", "truncated", "unmatched_response", "closed_mid_message", "not_http")}
        dropped = agent.metric_value("ebpf_receiver_exporter_dropped_items_total", signal="traces")
        rc = agent.stop()
        agent = None
        after = _wrk(port, seconds, connections)
    finally:
        if agent is not None:
            agent.stop()
        nginx.terminate()
        nginx.wait(10)
        collector.stop()
    rps_without = (before[0] / before[1] + after[0] / after[1]) / 2
    rps_with = with_agent[0] / with_agent[1]
    requests = with_agent[0]
    bpf_ns = (ns1[0] - ns0[0]) / max(requests, 1)
    runs = (ns1[1] - ns0[1]) / max(requests, 1)
    spans_per_request = spans / max(2 * requests, 1)
    cpu_pct = cpu / with_agent[1] * 100   # the CPU spent on the run's requests, over the run's time
    cpu_per_10k = cpu_pct / max(rps_with / 10_000, 1e-9)
    print(f"http: wrk -t1 -c{connections} {seconds} s keep-alive to nginx: {before[0] / before[1]:.0f} req/s "
          f"without the agent, {rps_with:.0f} with it, {after[0] / after[1]:.0f} without it again")
    print(f"  with the agent: {requests} requests, {int(spans)} spans accepted of {2 * requests} "
          f"(lost in the kernel {int(lost)}, dropped by the exporter {int(dropped)}); BPF "
          f"{(ns1[0] - ns0[0]) / 1e6:.1f} ms in {runs:.1f} program runs per request "
          f"({(ns1[0] - ns0[0]) / max(ns1[1] - ns0[1], 1):.0f} ns each; other processes' calls count too); "
          f"agent CPU {cpu:.2f} s ({busy:.1f} s until the spans were in)")
    print(f"  lost in the kernel by reason {_nonzero(lost_by)}; unparsed by reason {_nonzero(unparsed_by)}")
    print(f"bench: http throughput_ratio={rps_with / rps_without:.3f} ratio")
    print(f"bench: http bpf_ns_per_request={bpf_ns:.0f} ns")
    print(f"bench: http spans_per_request={spans_per_request:.3f} ratio")
    print(f"bench: http agent_cpu_per_10k_rps={cpu_per_10k:.1f} %")
    print(f"bench: http load_average={os.getloadavg()[0]:.1f} load")
    if smoke and (requests == 0 or spans == 0):
        print("http: smoke run produced no requests or no spans", file=sys.stderr)
        return 1
    return grpc_calls(smoke) or rc   # the HTTP/2 lines: gRPC unary calls (benchmarks/grpc_calls.py)


if __name__ == "__main__":
    sys.exit(run())
