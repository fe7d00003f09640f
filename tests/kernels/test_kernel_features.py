"""Kernel feature probes and the fallbacks they select, on this host's kernel: the fallbacks are
forced (``EBPF_RECEIVER_WITHOUT``) so they are proven exact here too, not only on old kernels
in the matrix."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver.kernel import features as kernel_features

from ..harness import REPO, Collector
from ..sources import test_syscalls_e2e as sc


def _release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def test_probe_matches_this_kernel() -> None:
    code = ("import json, receiver.kernel.features as k; "
            "print(json.dumps(k.probe().present))")
    import json

    present = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                                        capture_output=True, text=True).stdout)
    if os.geteuid() == 0 and _release() >= (5, 11):
        assert present["ringbuf"] and present["task_storage"] and present["task_btf"], present
    env = {**os.environ, "EBPF_RECEIVER_WITHOUT": "task_storage"}
    forced = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=env,
                                       capture_output=True, text=True).stdout)
    assert forced["task_storage"] is False


def test_degradations_name_the_feature_and_the_fix() -> None:
    feats = kernel_features.KernelFeatures({f.name: True for f in kernel_features.FEATURES}, True)
    assert kernel_features.degradations("syscalls", feats) == []
    assert kernel_features.syscalls_cflags(feats) == ["-DHAVE_TASK_STORAGE=1"]
    old = kernel_features.KernelFeatures({**feats.present, "task_storage": False, "task_btf": False}, True)
    (d,) = kernel_features.degradations("syscalls", old)
    assert d.name == "task_storage" and d.since == "5.11" and "thread id" in d.without and d.fix
    assert kernel_features.syscalls_cflags(old) == ["-DHAVE_TASK_STORAGE=0"]


@pytest.fixture
def without_task_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_RECEIVER_WITHOUT", "task_storage,task_btf")   # the agent inherits it


@pytest.fixture
def fallback_syscalls(bpf_ok: None, without_task_storage: None) -> Iterator[Any]:
    """The syscalls program as loaded where task storage is missing (5.10)."""
    from receiver.sources.base import compile_bpf

    kernel_features.probe.cache_clear()
    try:
        bpf = compile_bpf("syscalls", "syscalls.bpf.c", kernel_features.syscalls_cflags())
    finally:
        kernel_features.probe.cache_clear()
    try:
        yield bpf
    finally:
        bpf.cleanup()


@pytest.mark.bpf
def test_syscalls_fallback_program_has_no_task_storage(fallback_syscalls: Any) -> None:
    assert type(fallback_syscalls["start"]).__name__ == "HashTable"
    assert fallback_syscalls["start"].max_entries == 32768


@pytest.mark.bpf
def test_syscalls_fallback_frees_the_entries_of_threads_that_exit(fallback_syscalls: Any) -> None:
    """A thread ends inside exit_group, and its last switch must not park that call in the
    thread-id hash: 300 processes that exit leave no entries behind (the hash would fill)."""
    before = len(fallback_syscalls["start"].items())
    for _ in range(300):
        subprocess.run(["/bin/true"], check=True)
    after = len(fallback_syscalls["start"].items())
    # Threads elsewhere on the host may block in calls meanwhile: a few, not one per exit.
    assert after - before < 100, (before, after)


@pytest.mark.bpf
@pytest.mark.collector
def test_syscalls_fallback_counts_exactly(bpf_ok: None, without_task_storage: None,
                                          collector: Collector, tmp_path: Path) -> None:
    """The syscalls source's exact tests, with in-flight calls in the thread-id hash."""
    prog = sc.compile_c(sc.SOURCE, tmp_path / sc.PROG, "-O1")
    sc.test_per_process_calls_and_errors_are_exact(None, collector, tmp_path, prog)
    sc.test_blocked_call_is_timed_while_another_thread_uses_its_cpu(None, collector, tmp_path, prog)
    logs = "".join(p.read_text() for p in tmp_path.glob("agent-*.log"))
    assert "kernel without task_storage (added in 5.11)" in logs


def test_network_without_sock_length_tracepoints_is_disabled_with_reason_and_fix(
        bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """Before 6.3 (no sock:sock_send_length) the network source cannot count bytes exactly: it
    is disabled with the reason while the others run; ``check`` shows the row and the fix."""
    from ..harness import Agent, agent_config

    env = {"EBPF_RECEIVER_WITHOUT": "sock_length_tracepoints"}
    agent = Agent(tmp_path, agent_config(collector, {"network": {}, "process": {}}), env=env).start()
    try:
        assert agent.metric_value("ebpf_receiver_source_up", source="process") == 1
        assert agent.metric_value("ebpf_receiver_source_up", source="network") == 0
    finally:
        assert agent.stop() == 0
    assert "source network disabled: kernel without sock_length_tracepoints (added in 6.3)" in agent.log()
    check = subprocess.run([sys.executable, "-m", "receiver", "check"], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, **env}, check=False)
    assert check.returncode == 1
    row = next(line for line in check.stdout.splitlines() if "sock_length_tracepoints" in line)
    assert "missing" in row and "optional" not in row
    assert "fix: a kernel >= 6.3" in check.stdout
