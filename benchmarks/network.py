"""TCP connections under load: a small C client makes 5000 connections per second for 10 s to a
C server on loopback (each sends REQUEST bytes and gets RESPONSE bytes back), while the agent
(a real ``ebpf-otlp-receiver run`` process with only the network source, filtered to the server's
port) exports to the real Collector. Every connection gives two spans (client and server side).

Reports connections made, spans the Collector accepted (its own ``otelcol_receiver_accepted_spans``
count) and what the agent counted as lost (``ebpf_receiver_source_events_lost_total`` and exporter
drops). Target: spans = 2 × connections, lost = 0.

Smoke mode (``--smoke``): 500 connections per second for 2 s; the same agent, Collector and
counts, and it fails unless every connection's two spans arrive and nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from ._support import compile_c, discarding_collector_yaml, otelcol_bin

RATE = int(os.environ.get("BENCH_NETWORK_RATE", "5000"))   # connections per second
SECONDS = int(os.environ.get("BENCH_NETWORK_SECONDS", "10"))
SMOKE_RATE, SMOKE_SECONDS = 500, 2
REQUEST = 100
RESPONSE = 200

PROGRAM_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int read_n(int fd, char *buf, int n) {   /* n bytes, or to EOF when n < 0 */
    int got = 0;
    for (;;) {
        int want = n < 0 ? 4096 : n - got;
        if (want == 0) return got;
        int r = read(fd, buf, want > 4096 ? 4096 : want);
        if (r <= 0) return r < 0 ? -1 : got;
        got += r;
    }
}

int main(int argc, char **argv) {
    static char buf[4096];
    memset(buf, 'x', sizeof buf);
    int port = atoi(argv[2]), req = atoi(argv[3]), resp = atoi(argv[4]);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (strcmp(argv[1], "server") == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) { perror("listen"); return 1; }
        printf("ready\n");
        fflush(stdout);
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c < 0) continue;
            if (read_n(c, buf, req) == req) write(c, buf, resp);
            close(c);
        }
    }
    long rate = atol(argv[5]), seconds = atol(argv[6]), total = rate * seconds, ok = 0;
    struct timespec t0, next, end;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < total; i++) {
        long ns = t0.tv_nsec + i * (1000000000L / rate);
        next.tv_sec = t0.tv_sec + ns / 1000000000L;
        next.tv_nsec = ns % 1000000000L;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof a) == 0 && write(c, buf, req) == req &&
            read_n(c, buf, -1) == resp)
            ok++;
        close(c);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("%ld %.3f\n", ok, (end.tv_sec - t0.tv_sec) + (end.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
"""

COLLECTOR_YAML = discarding_collector_yaml(("traces", "metrics"), metrics_port_env="OTELCOL_METRICS_PORT")


def _scrape_sum(url: str, metric: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def run(smoke: bool = False) -> int:
    from tests.harness import Agent, Collector, free_port, wait_until

    rate, seconds = (SMOKE_RATE, SMOKE_SECONDS) if smoke else (RATE, SECONDS)
    workdir = Path(tempfile.mkdtemp(prefix="bench-network-"))
    binary = compile_c(PROGRAM_C, workdir / "netbench", "-O2")
    (workdir / "otelcol.yaml").write_text(COLLECTOR_YAML)
    col_metrics_port = free_port()
    collector = Collector(otelcol_bin(), workdir, config=workdir / "otelcol.yaml")
    collector.start(extra_env={"OTELCOL_METRICS_PORT": str(col_metrics_port)})
    col_url = f"http://127.0.0.1:{col_metrics_port}/metrics"
    port = free_port()
    config = {"exporter": {"endpoint": collector.endpoint, "queue_size": 50_000, "max_batch_size": 2048},
              "sources": {"process": {"enabled": False}, "profiler": {"enabled": False},
                          "syscalls": {"enabled": False},
                          "network": {"enabled": True, "ports": [port], "report_interval": "2s"}}}
    agent = Agent(workdir, config)
    server = None
    try:
        agent.start()
        server = subprocess.Popen([str(binary), "server", str(port), str(REQUEST), str(RESPONSE)],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        cpu0 = _cpu_seconds(agent.proc.pid)   # type: ignore[union-attr]
        out = subprocess.run([str(binary), "client", str(port), str(REQUEST), str(RESPONSE), str(rate),
                              str(seconds)], capture_output=True, text=True, check=True).stdout.split()
        connections, elapsed = int(out[0]), float(out[1])
        expected = 2 * connections

        def spans() -> float:
            return _scrape_sum(col_url, "otelcol_receiver_accepted_spans_total")

        try:
            wait_until(lambda: spans() >= expected, 30, 0.5, "all spans at the Collector")
        except AssertionError:
            pass   # reported below
        cpu = _cpu_seconds(agent.proc.pid) - cpu0   # type: ignore[union-attr]
        lost = agent.metric_value("ebpf_receiver_source_events_lost_total", source="network")
        dropped = agent.metric_value("ebpf_receiver_exporter_dropped_items_total", signal="traces")
        received = agent.metric_value("ebpf_receiver_source_events_received_total", source="network")
        got = int(spans())
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        rc = agent.stop()
        collector.stop()
    print(f"network: {connections} connections in {elapsed:.2f} s ({connections / elapsed:.0f}/s), "
          f"{REQUEST}+{RESPONSE} bytes each; 2 spans per connection expected = {expected}")
    print(f"  agent: {int(received)} records read, {int(lost)} lost in the kernel, {int(dropped)} spans dropped "
          f"by the exporter, {cpu:.1f} CPU s ({cpu / max(elapsed, 1e-9) * 100:.0f}% of one core)")
    print(f"  Collector accepted {got} spans")
    print(f"bench: network connections={connections} count")
    print(f"bench: network spans={got} count")
    print(f"bench: network lost={int(lost + dropped)} count")
    # A smoke run's load is light: anything short of every span, nothing lost, is a broken path.
    complete = got == expected and lost + dropped == 0
    if smoke and not complete:
        print(f"network: smoke run incomplete: {got} of {expected} spans, {int(lost + dropped)} lost",
              file=sys.stderr)
    return 0 if rc == 0 and (complete or not smoke) else 1


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(run())
