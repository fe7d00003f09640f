"""Caches that grow with the host: each is bounded by its config key and reported on /metrics
(``ebpf_receiver_cache_entries``, ``…_limit_entries``, ``…_evictions_total``), filled here by
real events of real BPF programs."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from receiver.config import EbpfConfig
from receiver.errors import ConfigError
from receiver.telemetry import CACHES, SelfTelemetry

from .harness import Agent, Collector, agent_config, compile_c, wait_until

LIMIT = 16
CHILDREN = 40

# Connects to the test's listener, spins on the CPU (so the profiler samples it), then waits.
CHILD_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    connect(s, (struct sockaddr *)&a, sizeof a);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    volatile unsigned long x = 0;
    do {
        for (int i = 0; i < 100000; i++) x += i;
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 300000000L);
    sleep(atoi(argv[2]));
    return 0;
}
"""


def test_every_cache_bound_is_a_validated_config_key() -> None:
    with pytest.raises(ConfigError) as e:
        EbpfConfig.from_dict({"caches": {"process_resources": 0, "symbol_frames": "many"}}, {})
    text = str(e.value)
    assert "caches.process_resources" in text and "caches.symbol_frames" in text
    assert EbpfConfig.from_dict({"caches": {"cgroups": 100}}, {}).caches.cgroups == 100


def test_cache_label_values_are_a_fixed_set() -> None:
    t = SelfTelemetry()
    with pytest.raises(ValueError, match="unknown cache"):
        t.watch_cache("per_pid_12345", lambda: 0, 1)
    t.watch_cache(CACHES[0], lambda: 3, 10, lambda: 2)
    assert t.caches() == {CACHES[0]: (3, 10, 2)}


def test_entries_of_gone_processes_are_swept_after_two_looks() -> None:
    """A record read after its process's exit (no exit event follows) makes an entry: swept."""
    from receiver.pipeline import ProcessResources

    resources = ProcessResources({"host.name": "h"})
    resources.SWEEP_INTERVAL = 0
    child = subprocess.Popen(["sleep", "30"])
    try:
        resources.get(child.pid, "sleep")
        resources.get(os.getpid(), "python")
        child.kill()
        child.wait()
        resources.get(child.pid, "sleep")   # the late record
        resources.sweep()
        assert len(resources) == 2, "one look is not enough: its last records may still come"
        resources.sweep()
        assert len(resources) == 1 and resources.get(os.getpid(), "python") is resources.get(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_docs_document_every_cache() -> None:
    from .harness import REPO

    section = (REPO / "docs" / "operations.md").read_text().split("### Caches", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert documented == set(CACHES)


@pytest.mark.bpf
@pytest.mark.collector
def test_caches_stay_within_their_limits_under_real_events(bpf_ok: None, collector: Collector,
                                                            tmp_path: Path) -> None:
    child = compile_c(CHILD_C, tmp_path / "cachechild", "-O1")
    caches = {"process_resources": LIMIT, "process_pids": LIMIT, "symbol_processes": LIMIT}
    agent = Agent(tmp_path, agent_config(
        collector,
        {"process": {},
         "network": {"report_interval": "1s", "max_attribute_sets": 4},
         "http": {},   # on for its caches only: every cache is checked below
         "profiler": {"preset": "development", "report_interval": "2s",
                      "filter": {"process_names": ["cachechild"]}}},
        caches=caches)).start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    port = listener.getsockname()[1]
    children: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(CHILDREN):   # all alive together: nothing leaves the caches by exiting
            children.append(subprocess.Popen([str(child), str(port), "60"]))

        def cache(name: str, metric: str = "ebpf_receiver_cache_entries") -> float:
            return agent.metric_value(metric, cache=name)

        for name in ("process_resources", "process_pids", "symbol_processes"):
            wait_until(lambda n=name: cache(n, "ebpf_receiver_cache_evictions_total") >= CHILDREN - LIMIT,
                       60, 0.5, f"{name} to evict")
            assert 0 < cache(name) <= LIMIT
            assert cache(name, "ebpf_receiver_cache_limit_entries") == LIMIT
        # Per-process connection series: at most max_attribute_sets plus the overflow series.
        wait_until(lambda: cache("network_series") == 5, 30, 0.5, "network series to reach the bound")
        assert cache("network_open_connections") >= CHILDREN
        text = agent.scrape()
        for name in CACHES:   # every cache reported, whether or not it is used in this run
            assert f'ebpf_receiver_cache_entries{{cache="{name}"}}' in text, name
    finally:
        for c in children:
            c.kill()
            c.wait()
        listener.close()
        agent.stop()
