"""Off-CPU time (``sources.profiler.off_cpu``): real BPF, a real Python workload whose threads
wait in known ways and measure their own waits.

One workload (``WORKLOAD``) runs three threads for a few seconds once told to start: a worker
that waits, for seconds in all, for a lock another thread holds (``wait_for_lock``
under ``worker``), a sleeper in ``nanosleep`` (``nap``), and a reader blocked on a pipe
(``read_pipe``) that a writer feeds. Each prints the wall time its waits took. The profiler,
filtered to the workload, must attribute off-CPU nanoseconds to each waiting function under its
caller within 20 % of that, with every switch recorded and with half of them (totals scaled by
1 / probability)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..harness import REPO, Agent, Collector, agent_config, wait_until
from .test_unwind_e2e import Profiled

pytestmark = [pytest.mark.bpf]

RUN_S = 6.0
WORKLOAD = """\
import json, os, select, sys, threading, time

RUN_S = float(sys.argv[1])
lock = threading.Lock()
waits = {"lock": 0.0, "nap": 0.0, "pipe": 0.0}
tids = {}
stop_at = 0.0


def holder():
    while time.monotonic() < stop_at:
        with lock:
            time.sleep(0.009)
        time.sleep(0.0002)


def wait_for_lock():
    t = time.monotonic()
    lock.acquire()
    waits["lock"] += time.monotonic() - t
    lock.release()


def compute():
    t = time.monotonic()
    while time.monotonic() - t < 0.001:
        pass


def worker():
    tids["lock"] = threading.get_native_id()
    while time.monotonic() < stop_at:
        wait_for_lock()
        compute()


def nap():
    t = time.monotonic()
    time.sleep(0.005)
    waits["nap"] += time.monotonic() - t


def sleeper():
    tids["nap"] = threading.get_native_id()
    while time.monotonic() < stop_at:
        nap()


r, w = os.pipe()


def read_pipe():
    t = time.monotonic()
    data = os.read(r, 1)
    waits["pipe"] += time.monotonic() - t
    return data


def reader():
    tids["pipe"] = threading.get_native_id()
    while read_pipe() != b"q":
        pass


def writer():
    while time.monotonic() < stop_at:
        time.sleep(0.004)
        os.write(w, b"x")
    os.write(w, b"q")


while not select.select([sys.stdin], [], [], 0.05)[0]:
    pass                      # switches out now and then: the profiler notices the process
sys.stdin.readline()          # the profiler is ready
stop_at = time.monotonic() + RUN_S
threads = [threading.Thread(target=f) for f in (holder, worker, sleeper, reader, writer)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"waits": waits, "tids": tids}), flush=True)
"""

WAITS = {"lock": ("wait_for_lock", "worker"), "nap": ("nap", "sleeper"), "pipe": ("read_pipe", "reader")}


# Without unwind tables (a kernel before 5.15: no bpf_task_pt_regs) the user stack is the kernel's
# frame-pointer walk, which stops in libc; the sleeper and the reader wait nowhere else (in their
# kernel wait, then for the GIL), so each thread's whole off-CPU time is compared, and the kernel
# wait must be in its stacks.
KERNEL_WAITS = {"nap": "do_nanosleep", "pipe": "pipe_read"}


def _run(tmp_path: Path, probability: float, walked: bool = True) -> tuple[dict[str, Any], dict[str, int], Any]:
    """Runs the workload profiled; returns what it measured, the off-CPU ns attributed to each
    waiting function directly under its caller in its thread (``walked``; else to the thread,
    provided its kernel wait is among its stacks), and the sampler's counters."""
    from receiver.config import ProcessFilter
    from receiver.config.schema import OffCpuConfig

    script = tmp_path / "waits.py"
    script.write_text(WORKLOAD)
    proc = subprocess.Popen([sys.executable, str(script), str(RUN_S)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    prof = None
    try:
        prof = Profiled(proc.pid, filter=ProcessFilter(pids=[proc.pid]),
                        off_cpu=OffCpuConfig(enabled=True, sample_probability=probability))
        sampler = prof.sampler
        assert proc.stdin is not None and proc.stdout is not None
        if walked:
            # Its main thread waits for stdin in 50 ms steps: a switch-out announces it, its tables load.
            wait_until(lambda: sampler.unwinder is not None and sampler.unwinder.stats["processes_loaded"] >= 1
                       and sampler.unwinder.wait_idle(5), 60, 0.2, "the workload's unwind tables")
            python = sampler.runtime("cpython")
            assert python is not None, "Python frames are off"
            wait_until(lambda: python.stats["processes_loaded"] >= 1, 30, 0.2, "the interpreter entry")
        else:
            assert sampler.unwinder is None, "unwinding is on although bpf_task_pt_regs is hidden"
        sampler.drain()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        profiles = []
        while proc.poll() is None:
            profiles.append(prof.measure(1.0))
        profiles.append(sampler.drain())
        measured = json.loads(proc.stdout.read())
        stats = sampler.offcpu_stats()
    finally:
        if prof is not None:
            prof.close()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
    got = dict.fromkeys(WAITS, 0)
    waited_in_kernel = set()
    for profile in profiles:
        assert profile.off_cpu is not None
        for s in profile.off_cpu.samples:
            py = [f.function for f in s.frames if f.frame_type == "cpython"]
            kernel = {f.function for f in s.frames if f.frame_type == "kernel"}
            for name, (leaf, caller) in WAITS.items():
                if s.tid != measured["tids"][name]:
                    continue
                if not walked:
                    got[name] += s.count
                    if any(KERNEL_WAITS.get(name, "-") in k for k in kernel):
                        waited_in_kernel.add(name)
                elif py[:2] == [leaf, caller]:
                    got[name] += s.count
    if not walked:
        got = {name: n if name in waited_in_kernel else 0 for name, n in got.items()}
    return measured, got, stats


@pytest.fixture(scope="module")
def every_switch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, int], Any]:
    return _run(tmp_path_factory.mktemp("offcpu"), 1.0)


@pytest.fixture(scope="module")
def half_the_switches(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, int], Any]:
    return _run(tmp_path_factory.mktemp("offcpu"), 0.5)


def _within(got: int, measured_s: float) -> bool:
    return abs(got / 1e9 - measured_s) <= 0.2 * measured_s


@pytest.mark.parametrize("wait", ["lock", "nap", "pipe"])
def test_blocked_time_under_waiting_function(bpf_ok: None, every_switch: Any, wait: str) -> None:
    measured, got, stats = every_switch
    assert stats["unsampled"] == 0 and stats["counted"] > 0, stats
    want = measured["waits"][wait]
    assert want > 1.0, measured          # the workload did wait
    assert _within(got[wait], want), (wait, got, measured, stats)


@pytest.mark.parametrize("wait", ["lock", "nap", "pipe"])
def test_sampled_totals_scaled_to_blocked_time(bpf_ok: None, half_the_switches: Any, wait: str) -> None:
    measured, got, stats = half_the_switches
    assert stats["unsampled"] > 0 and stats["recorded"] > 0, stats   # sampling did pass switches over
    assert _within(got[wait], measured["waits"][wait]), (wait, got, measured, stats)


@pytest.mark.parametrize("wait", sorted(KERNEL_WAITS))
def test_without_task_pt_regs_frame_pointer_stacks_still_timed(bpf_ok: None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, wait: str) -> None:
    """A kernel without bpf_task_pt_regs (5.10): no table walk, the kernel's frame-pointer user
    stack, the same times (the kernel matrix's 5.10 guest is that kernel; here it is simulated)."""
    from receiver.kernel import features

    monkeypatch.setenv("EBPF_RECEIVER_WITHOUT", "task_pt_regs")
    features.probe.cache_clear()
    try:
        measured, got, stats = _run(tmp_path, 1.0, walked=False)
    finally:
        monkeypatch.delenv("EBPF_RECEIVER_WITHOUT")
        features.probe.cache_clear()
    assert _within(got[wait], measured["waits"][wait]), (wait, got, measured, stats)


SLEEPER = """\
import sys, time


def nap():
    time.sleep(0.01)


def sleeper():
    while True:
        nap()


sleeper()
"""


def test_cli_off_cpu_writes_off_cpu_pprof(bpf_ok: None, tmp_path: Path) -> None:
    """``profile --off-cpu``: a pprof whose one sample type is off_cpu/nanoseconds, which
    ``go tool pprof -sample_index=off_cpu`` reads, with the sleeper's time under nap; the flame
    graph too."""
    from receiver.profiling.model import OFF_CPU
    from receiver.profiling.output.pprof import from_pprof, read_pprof

    if not shutil.which("go"):
        pytest.fail("go is not installed (go tool pprof reads our pprof)")
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, str(script)])
    out, svg = tmp_path / "offcpu.pb.gz", tmp_path / "offcpu.svg"
    try:
        cli = subprocess.run([sys.executable, "-m", "receiver", "profile", "--off-cpu", "--duration", "10s",
                              "--pid", str(proc.pid), "--output", str(out), "--flamegraph", str(svg)],
                             check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert cli.returncode == 0, cli.stderr
    assert "off-CPU:" in cli.stderr, cli.stderr
    pprof = read_pprof(out)
    strings = list(pprof.string_table)
    assert [(strings[t.type], strings[t.unit]) for t in pprof.sample_type] == [("off_cpu", "nanoseconds")]
    profile = from_pprof(pprof)
    assert profile.sample_type == OFF_CPU
    # The sleeper is off the CPU nearly all the time the events are open: the 10 s, plus a little
    # before (attach) and after, up to the end of the stop the CLI counts in what it reports.
    # Part of it is walked with Python frames, once its tables and the walkers loaded (the CLI
    # does not wait for them: a loaded runner took several seconds, so 10 s, not 4).
    m = re.search(r"sampled for ([\d.]+)s", cli.stderr)
    assert m, cli.stderr
    total = sum(s.count for s in profile.samples)
    assert 0.8 * 10e9 <= total <= (float(m[1]) + 1) * 1e9, (total, cli.stderr)
    in_nap = sum(s.count for s in profile.samples if "nap" in [f.function for f in s.frames])
    assert in_nap > 0, cli.stderr
    top = subprocess.run(["go", "tool", "pprof", "-top", "-sample_index=off_cpu", "-symbolize=none", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert top.returncode == 0 and "do_nanosleep" in top.stdout, top.stdout + top.stderr
    assert svg.read_text().startswith("<?xml") or "<svg" in svg.read_text()


def test_collector_receives_off_cpu_beside_cpu(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """The agent with ``off_cpu`` on: the Collector gets, per process, an off_cpu/nanoseconds
    profile beside the samples/count one, with the sleeper's nap among its Python frames."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        cfg = {"preset": "development", "report_interval": "2s", "filter": {"pids": [proc.pid]},
               "off_cpu": {"enabled": True, "sample_probability": 1.0}}
        agent = Agent(tmp_path, agent_config(collector, {"profiler": cfg})).start()
        try:
            def naps() -> int:
                return sum(ns for types, name, ns in _otlp_off_cpu(collector) if name == "nap")

            wait_until(lambda: naps() > 1e9, 120, 0.5, "a second of off_cpu time under nap in profiles.jsonl")
            assert agent.metric_value("ebpf_receiver_profiler_off_cpu_total", event="counted") > 0
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()
    kinds = {types for types, _, _ in _otlp_off_cpu(collector)}
    assert kinds == {("off_cpu", "nanoseconds")}


def _otlp_off_cpu(collector: Collector) -> list[tuple[tuple[str, str], str, int]]:
    """(sample type, Python function, value) for every Python frame of every off_cpu sample the
    Collector wrote; also checks each such profile sits beside a samples/count one or alone."""
    out = []
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings = d.get("stringTable", [])
        funcs, locs, stacks = d.get("functionTable", []), d.get("locationTable", []), d.get("stackTable", [])
        for rp in req.get("resourceProfiles", []):
            for sp in rp.get("scopeProfiles", []):
                for p in sp.get("profiles", []):
                    st = p.get("sampleType", {})
                    types = (strings[st.get("typeStrindex", 0)], strings[st.get("unitStrindex", 0)])
                    if types[0] != "off_cpu":
                        continue
                    for sample in p.get("samples", []):
                        value = int(sample.get("values", [0])[0])
                        stack = stacks[sample.get("stackIndex", 0)]
                        for li in stack.get("locationIndices", []):
                            for line in locs[li].get("lines", []):
                                name = strings[funcs[line.get("functionIndex", 0)].get("nameStrindex", 0)]
                                out.append((types, name, value))
    return out
