"""CPU profiler, end to end: the real BPF program sampling a C program built here.

The program burns CPU in ``burn_a`` and ``burn_b`` in a 2:1 ratio of its own thread CPU time
(measured with CLOCK_THREAD_CPUTIME_ID, so a busy shared machine does not skew the truth), or
makes getppid() calls in a tight loop, and prints its CPU time (getrusage) when done. Modes
ending in ``-cpu`` run for that much process CPU time rather than wall-clock time, so a loaded
runner stretches them but does not shrink the samples they give."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..harness import (
    REPO,
    TIME_SCALE,
    Agent,
    Collector,
    agent_config,
    any_value,
    compile_c,
    go_env,
    wait_until,
)

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

FREQUENCY = 99
# The split and the count against CPU time are judged by sampling statistics, whose margins shrink
# with the number of samples: 10x the samples per CPU-s where a test is about them (the
# development preset allows up to 1000 Hz; the timer's period, 1.001 ms, then puts three samples,
# evenly spaced, in each 3 ms cycle of the burner's).
ACCURACY_FREQUENCY = 999
BURNERS = ("burn_a", "burn_b")

SOURCE = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static double clock_s(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Spins for `seconds` of this thread's CPU time. */
__attribute__((noinline)) void burn_a(double seconds) {
    double end = clock_s(CLOCK_THREAD_CPUTIME_ID) + seconds;
    do {
        for (int i = 0; i < 20000; i++)
            sink += i;
    } while (clock_s(CLOCK_THREAD_CPUTIME_ID) < end);
}

__attribute__((noinline)) void burn_b(double seconds) {
    double end = clock_s(CLOCK_THREAD_CPUTIME_ID) + seconds;
    do {
        for (int i = 0; i < 20000; i++)
            sink += i;
    } while (clock_s(CLOCK_THREAD_CPUTIME_ID) < end);
}

/* Random-depth recursion through eight functions: a new stack at nearly every sample. */
static unsigned long state = 88172645463325252UL;
__attribute__((noinline)) void deep(unsigned d);
__attribute__((noinline)) void deeper(unsigned d);
static void (*const steps[2])(unsigned) = {deep, deeper};

__attribute__((noinline)) void deep(unsigned d) {
    for (int i = 0; i < 3000; i++)
        sink += i;
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    if (d)
        steps[state & 1](d - 1);
}

__attribute__((noinline)) void deeper(unsigned d) {
    for (int i = 0; i < 3000; i++)
        sink += i;
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    if (d)
        steps[state & 1](d - 1);
}

__attribute__((noinline)) void syscall_loop(clockid_t clock, double seconds) {
    double end = clock_s(clock) + seconds;
    do {
        for (int i = 0; i < 1000; i++)
            syscall(SYS_getppid);
    } while (clock_s(clock) < end);
}

int main(int argc, char **argv) {
    double seconds = atof(argv[2]);
    if (argc > 3) {                 /* wait for a byte on stdin: the profiler is attached */
        char c;
        if (read(0, &c, 1) != 1)
            return 3;
    }
    clockid_t clock = strstr(argv[1], "-cpu") ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC;
    double t0 = clock_s(clock);
    if (strncmp(argv[1], "ratio", 5) == 0) {
        while (clock_s(clock) - t0 < seconds) {
            burn_a(0.002);
            burn_b(0.001);
        }
    } else if (strncmp(argv[1], "stacks", 6) == 0) {
        while (clock_s(clock) - t0 < seconds)
            deep(24 + (state & 15));
    } else {
        syscall_loop(clock, seconds);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%.6f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                     ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    return 0;
}
"""


@pytest.fixture(scope="module")
def burner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(SOURCE, tmp_path_factory.mktemp("burner") / "prof_burner",
                     "-O1", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer")


def _config(max_stacks: int = 16384, report_interval: float = 2.0, frequency: int = FREQUENCY,
            **filter_: Any) -> Any:
    from receiver.config import ProcessFilter, ProfilerSourceConfig

    return ProfilerSourceConfig(preset="development", frequency=frequency, report_interval=report_interval,
                                max_stacks=max_stacks, filter=ProcessFilter(**filter_))


def _cpu_time_margin(expected: float) -> float:
    """How far a sample count may stray from ``expected`` = the burner's CPU seconds x frequency.
    The cpu-clock event is a per-CPU hrtimer with a fixed 1/frequency s period; each firing
    samples the burner with probability = the share of that period it ran. So the count is a
    sum of independent trials: mean = CPU-s x frequency, variance below the mean, whatever the
    load (load changes the trials' odds, not the mean). 5 standard deviations: crossed by chance
    once in 3.5 million runs; plus 3 for the edges (the burner's exec before the profiler was
    attached, a period cut at its end). A lost or doubled sample path, or a wrong period (2x, 1/2x),
    lands far outside it."""
    return 5 * expected ** 0.5 + 3


def _share_margin(p: float, n: int) -> float:
    """How far the share of ``n`` samples that fall in a function the burner gives a share ``p``
    of its CPU time (measured with its thread's own CPU clock, so load cannot skew it) may stray
    from ``p``. Each sample lands in it with probability ``p``: the timer's period is no multiple
    of the burner's 3 ms cycle, so samples fall at every phase of it (evenly spaced when the burner
    runs alone, which varies less than chance; at random phases under load). So at most the
    binomial spread: 5 standard deviations (crossed by chance once in 3.5 million runs), plus 1/n
    for rounding. A 1:1 split, or the two swapped (1/3), lies outside it from 300 samples on."""
    return 5 * (p * (1 - p) / n) ** 0.5 + 1 / n


def _assert_every_sample_counted(total: int, cpu_s: float, stats: dict[str, int],
                                 frequency: int = FREQUENCY) -> None:
    """The profile holds exactly the samples the kernel took of the burner (the filter selects
    only it, and every sample lands in one of the kernel's tallies): load cannot move this. And
    their number is what the burner's CPU time (getrusage, not wall time) gives at ``frequency``,
    within ``_cpu_time_margin``."""
    assert stats["dropped"] == 0 and total == stats["counted"] + stats["recorded"], (total, stats)
    expected = frequency * cpu_s
    assert abs(total - expected) <= _cpu_time_margin(expected), (
        f"{total} samples for {cpu_s:.3f} CPU-s at {frequency} Hz: expected {expected:.0f} "
        f"+- {_cpu_time_margin(expected):.0f}")


def _run_profiled(burner: Path, mode: str, seconds: float,
                  **config: Any) -> tuple[Any, float, int, dict[str, int]]:
    """Runs the burner under the profiler (filtered to its pid); returns the profile, the
    burner's CPU seconds, its pid and the kernel's sample tallies."""
    from receiver.profiling.cpu_profiler import EbpfCpuProfiler

    proc = subprocess.Popen([str(burner), mode, str(seconds), "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    profiler = EbpfCpuProfiler(_config(pids=[proc.pid], **config))
    stats: dict[str, int] = {}
    try:
        profiler.start()
        out, _ = proc.communicate("g", timeout=10 * seconds + 120)   # -cpu modes stretch under load
        stats = profiler.sampler.stats()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        profile = profiler.stop_profile() if profiler.running else None
    assert proc.returncode == 0, f"burner failed: {proc.returncode}"
    return profile, float(out), proc.pid, stats


def _names(sample: Any) -> set[str]:
    return {f.function for f in sample.frames}


def test_accuracy_two_functions_two_to_one(bpf_ok: None, burner: Path) -> None:
    profile, cpu_s, pid, stats = _run_profiled(burner, "ratio", 6.0, frequency=ACCURACY_FREQUENCY)
    mine = [s for s in profile.samples if s.pid == pid]
    total = sum(s.count for s in mine)
    assert total, "no samples of the burner"
    a = sum(s.count for s in mine if "burn_a" in _names(s))
    b = sum(s.count for s in mine if "burn_b" in _names(s))
    # The rest are in clock_gettime: the burners' (and main's) reads of the thread's CPU clock,
    # a system call, whose libc frame the walk cannot pass until libc's unwind table is loaded
    # (under load: seconds), and where a busy runner preempts the burner (10 % of the samples
    # beside three busy loops). Nothing else runs but main's loop and the exit:
    # 1 % and 3 samples are more than those ever take.
    clock = sum(s.count for s in mine if not _names(s) & set(BURNERS)
                and [f.function for f in s.frames if f.frame_type != "kernel"][:1] == ["clock_gettime"])
    assert total - a - b - clock <= 0.01 * total + 3, f"{a}+{b}+{clock} of {total} in the burners or clock reads"
    # 2:1 of the burner's thread CPU time: burn_a's share of the burners' samples is 2/3.
    assert abs(a / (a + b) - 2 / 3) <= _share_margin(2 / 3, a + b), f"burn_a:burn_b = {a}:{b}"
    _assert_every_sample_counted(total, cpu_s, stats, ACCURACY_FREQUENCY)
    # Frames are leaf first, callers after: main calls the burners.
    stack = next(s for s in mine if s.frames and s.frames[0].function == "burn_a")
    assert [f.function for f in stack.frames[:2]] == ["burn_a", "main"]
    assert {s.thread_name for s in mine} == {"prof_burner"} and {s.process_name for s in mine} == {"prof_burner"}


def test_syscalls_show_kernel_frames_beneath_user_frames(bpf_ok: None, burner: Path) -> None:
    # 3 s of CPU time, not of the clock on the wall: a loaded runner gave the loop too little CPU
    # for 20 samples in 3 wall seconds (CI, load 15).
    profile, _, pid, _ = _run_profiled(burner, "syscalls-cpu", 3.0)
    # glibc's syscall() keeps no frame pointer, so frame-pointer unwinding goes from it
    # straight to main (syscall_loop's own frame is skipped).
    mixed = [s for s in profile.samples if s.pid == pid and "main" in _names(s)
             and any(f.frame_type == "kernel" for f in s.frames)]
    assert sum(s.count for s in mixed) >= 20, "few samples with kernel frames under main"
    for s in mixed:
        types = [f.frame_type for f in s.frames]
        n_kernel = types.count("kernel")
        assert types[:n_kernel] == ["kernel"] * n_kernel, f"kernel frames not leaf-most: {types}"
        assert all(f.function and not f.function.startswith("0x") for f in s.frames[:n_kernel])
    kernel_names = {f.function for s in mixed for f in s.frames if f.frame_type == "kernel"}
    assert "__x64_sys_getppid" in kernel_names and "do_syscall_64" in kernel_names, kernel_names


def test_stacks_the_stack_map_refuses_are_still_counted(bpf_ok: None, burner: Path) -> None:
    """A stack map of 64 against thousands of distinct stacks: the refused samples come whole
    over the ring buffer, so the count still matches the CPU time and the stacks are right.

    The maps are drained only at the end (a 60 s report interval against a run of 4 CPU-s):
    past the first 64 stacks every sample is refused, however slowly a loaded runner lets the
    burner go. (With the 2 s interval, each drain made room for 64 more, and the fewer samples
    a loaded runner gave per interval, the fewer were refused: CI saw 24 of 170.)"""
    profile, cpu_s, pid, stats = _run_profiled(burner, "stacks-cpu", 4.0, max_stacks=64, report_interval=60.0)
    mine = [s for s in profile.samples if s.pid == pid]
    total = sum(s.count for s in mine)
    assert stats["recorded"] >= 0.5 * total, stats   # about 400 samples, at most ~64 stacks fit
    _assert_every_sample_counted(total, cpu_s, stats)
    deep = [s for s in mine if s.frames and s.frames[0].function in ("deep", "deeper")]
    assert sum(s.count for s in deep) >= 0.8 * total
    def whole(s: Any) -> bool:   # the recursion, then main (a sample in a function's
        names = [f.function for f in s.frames]   # prologue skips its caller's frame)
        return names[next(i for i, n in enumerate(names) if n not in ("deep", "deeper"))] == "main"

    assert sum(s.count for s in deep if whole(s)) >= 0.9 * sum(s.count for s in deep)
    assert len({s.frames for s in deep}) >= 0.5 * len(deep), "expected mostly distinct stacks"


def test_short_lived_process_is_symbolized(bpf_ok: None, burner: Path, tmp_path: Path) -> None:
    """The process exits long before the drain; its mappings were captured on its first sample."""
    from receiver.profiling.cpu_profiler import EbpfCpuProfiler
    from receiver.profiling.output.pprof import from_pprof

    short = tmp_path / "prof_short"
    shutil.copy(burner, short)
    profiler = EbpfCpuProfiler(_config(process_names=["prof_short"], frequency=ACCURACY_FREQUENCY)).start()
    stats: dict[str, int] = {}
    try:
        # 0.3 s of CPU time, however long a loaded runner makes that take: about 300 samples.
        proc = subprocess.Popen([str(short), "ratio-cpu", "0.3"], stdout=subprocess.PIPE, text=True)
        proc_pid = proc.pid
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        stats = profiler.sampler.stats()   # final: the filter selects only prof_short, now gone
        time.sleep(0.3)   # gone well before stop_profile() drains
    finally:
        profile = from_pprof(profiler.stop())   # the library's pprof result
    mine = [s for s in profile.samples if s.process_name == "prof_short" and s.pid == proc_pid]
    total = sum(s.count for s in mine)
    named = sum(s.count for s in mine if _names(s) & set(BURNERS))
    # Every sample the kernel took of it is in the profile, as many as its CPU time gives (a
    # 0.3 CPU-s burner: 300 +- 90), though it was gone before the drain.
    _assert_every_sample_counted(total, float(out), stats, ACCURACY_FREQUENCY)
    assert named / total >= 0.8, f"only {named} of {total} samples symbolized to the burners"


def test_cli_writes_pprof_folded_and_svg(bpf_ok: None, burner: Path, tmp_path: Path) -> None:
    if not shutil.which("go"):
        pytest.fail("go is not installed (go tool pprof reads our pprof)")
    # Killed below; long enough to outlast a slow BPF compile on a loaded runner (the CLI loads first).
    proc = subprocess.Popen([str(burner), "ratio", "600"], stdout=subprocess.DEVNULL)
    out, folded, svg = tmp_path / "cpu.pb.gz", tmp_path / "cpu.folded", tmp_path / "cpu.svg"
    try:
        cli = subprocess.run([sys.executable, "-m", "receiver", "profile", "--duration", "3s",
                              "--pid", str(proc.pid), "--output", str(out), "--folded", str(folded),
                              "--flamegraph", str(svg)], check=False, capture_output=True, text=True,
                             cwd=REPO,
                             timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert cli.returncode == 0, cli.stderr
    assert "samples" in cli.stderr
    # Walked with unwind tables; truncated only while libc's table was still loading (the
    # program's own comes first). The CLI does not wait for tables, and how many samples fall
    # before libc's arrives depends on the runner's load (CI saw 20 of 82), so the check is
    # where walks stopped, not how many: every burner stack reaches either _start (through
    # libc's table: it did load and was used) or stops exactly where the program's own code
    # returns into libc (before its table arrived). A walk that stops inside the program, or a libc table that never
    # loads, fails. (That walks stay whole once the tables are in is test_unwind_e2e's.)
    m = re.search(r"(\d+) samples in .*\nuser stacks: ([1-9]\d*) walked with unwind tables, (\d+) of the "
                  r"profiled samples truncated .*?, (\d+) with frame pointers only", cli.stderr)
    assert m, cli.stderr
    roots: collections.Counter[str] = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")[1:]   # after the process name, root first
        if "main" in frames and set(frames) & set(BURNERS):
            roots[frames[0] if frames[0] == "_start" else ";".join(frames[:frames.index("main") + 1])] += int(count)
    assert roots["_start"] > 0, (roots, cli.stderr)
    assert set(roots) <= {"_start", "__libc_start_call_main;main"}, (roots, cli.stderr)
    # Those stopped at libc are samples the CLI reported as truncated or as walked with frame
    # pointers only (libc keeps none): the report accounts for every one.
    assert roots["__libc_start_call_main;main"] <= int(m.group(3)) + int(m.group(4)), (roots, cli.stderr)
    top = subprocess.run(["go", "tool", "pprof", "-top", "-symbolize=none", str(out)],
                         check=False, capture_output=True, text=True, env=go_env(tmp_path),
                         timeout=240)   # the first use builds the tool (go_env keeps it for the next)
    assert top.returncode == 0, top.stderr
    assert "burn_a" in top.stdout and "burn_b" in top.stdout, top.stdout
    folded_text = folded.read_text()
    assert "main;burn_a" in folded_text and "main;burn_b" in folded_text, folded_text[:2000]
    svg_text = svg.read_text()
    assert svg_text.startswith("<?xml") and "burn_a" in svg_text and "burn_b" in svg_text


def test_cli_ctrl_c_ends_early_and_still_writes(bpf_ok: None, burner: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([str(burner), "ratio", "900"], stdout=subprocess.DEVNULL)
    out, err_path = tmp_path / "cpu.pb.gz", tmp_path / "stderr.txt"
    try:
        with open(err_path, "w") as err:
            cli = subprocess.Popen([sys.executable, "-m", "receiver", "profile", "--duration", "900s",
                                    "--pid", str(proc.pid), "--output", str(out)],
                                   stderr=err, cwd=REPO)
            try:
                wait_until(lambda: "attached" in err_path.read_text(), 60, 0.2, "the profiler to attach")
                time.sleep(2)
                t0 = time.monotonic()
                cli.send_signal(signal.SIGINT)
                # The profile was asked for 900 s: ending within 180 s proves Ctrl-C ended it, with
                # room for a loaded runner (a CI run took over 30 s to detach, symbolize and write).
                try:
                    code = cli.wait(180)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"no exit 180 s after Ctrl-C: {err_path.read_text()}") from None
                assert code == 0, err_path.read_text()
                assert time.monotonic() - t0 < 180
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait()
    finally:
        proc.kill()
        proc.wait()
    assert "stopped by Ctrl-C" in err_path.read_text()
    from receiver.profiling.output.pprof import from_pprof, read_pprof

    names = {f.function for s in from_pprof(read_pprof(out)).samples for f in s.frames}
    assert {"burn_a", "burn_b"} <= names


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "receiver", "profile", *args],
                              check=False, capture_output=True, text=True, cwd=REPO, timeout=60)

    bad_duration = run("--duration", "ten", "--output", str(tmp_path / "x.pb.gz"))
    assert bad_duration.returncode == 2 and "duration" in bad_duration.stderr
    bad_freq = run("--frequency", "5000", "--output", str(tmp_path / "x.pb.gz"))
    assert bad_freq.returncode == 2 and "frequency" in bad_freq.stderr
    no_dir = run("--output", str(tmp_path / "missing" / "x.pb.gz"))
    assert no_dir.returncode == 2 and "does not exist" in no_dir.stderr


def test_cli_without_privileges_exits_1_with_the_fix(bpf_ok: None) -> None:
    out = Path("/tmp") / f"profile-nobody-{os.getpid()}.pb.gz"   # a directory nobody can reach
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-m", "receiver", "profile", "--duration", "1s",
                             "--output", str(out)],
                            check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert nobody.returncode == 1, nobody.stderr
    assert "needs root" in nobody.stderr and "sudo" in nobody.stderr
    assert not out.exists()


def _decode_kv(kv: dict[str, Any], strings: list[str]) -> tuple[str, Any]:
    """An attribute as the Collector writes it: key and string values either inline or as
    string-table indices (``keyStrindex``, ``stringValueStrindex``)."""
    key = kv["key"] if "key" in kv else strings[kv.get("keyStrindex", 0)]
    value = kv.get("value", {})
    if "stringValueStrindex" in value:
        return key, strings[value["stringValueStrindex"]]
    return key, any_value(value)


def _otlp_samples(collector: Collector) -> Iterator[tuple[list[str], dict[str, Any], int, dict[str, Any]]]:
    """(function names leaf first, sample attributes, count, resource attributes) per sample,
    decoded through each request's ``ProfilesDictionary``."""
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings, funcs = d.get("stringTable", []), d.get("functionTable", [])
        locs, stacks, attrs = d.get("locationTable", []), d.get("stackTable", []), d.get("attributeTable", [])
        assert strings and strings[0] == "" and funcs and locs and stacks and attrs, "dictionary tables"
        for rp in req.get("resourceProfiles", []):
            res = dict(_decode_kv(kv, strings) for kv in rp.get("resource", {}).get("attributes", []))
            for sp in rp.get("scopeProfiles", []):
                for prof in sp.get("profiles", []):
                    for s in prof.get("samples", []):
                        names = []
                        for li in stacks[s.get("stackIndex", 0)].get("locationIndices", []):
                            for line in locs[li].get("lines", []):
                                names.append(strings[funcs[line.get("functionIndex", 0)].get("nameStrindex", 0)])
                        sattrs = dict(_decode_kv(attrs[i], strings) for i in s.get("attributeIndices", []))
                        yield names, sattrs, int(s["values"][0]), res


SIDECAR_CPU_S = 2.0       # of the burner's CPU time: about 1000 samples at SIDECAR_FREQUENCY,
SIDECAR_FREQUENCY = 499   # so its 2:1 split is judged within +-0.075 (``_share_margin``)


def test_sidecar_exports_profiles_to_the_collector(bpf_ok: None, burner: Path, collector: Collector,
                                                   tmp_path: Path) -> None:
    """Every sample the agent took of the burner reaches the Collector, once: as many as the agent
    counted (its self-metrics) and wrote to its pprof files, stack by stack, none lost in the
    kernel; and burn_a and burn_b come out 2:1 as the burner spent its CPU time."""
    # Waits for a byte on stdin before it burns: in an emulated guest (the kernel matrix) the
    # agent's start alone can take minutes. Then SIDECAR_CPU_S of its own CPU time, however long
    # a loaded runner makes that take, and it exits.
    proc = subprocess.Popen([str(burner), "ratio-cpu", str(SIDECAR_CPU_S), "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def at_collector() -> list[tuple[list[str], dict[str, Any], int, dict[str, Any]]]:
        return [x for x in _otlp_samples(collector) if x[1].get("process.pid") == proc.pid]

    try:
        cfg = {"preset": "development", "frequency": SIDECAR_FREQUENCY, "report_interval": "2s",
               "filter": {"pids": [proc.pid]}, "pprof_dir": str(tmp_path / "pprof")}
        agent = Agent(tmp_path, agent_config(collector, {"profiler": cfg})).start()
        try:
            proc.communicate("g", timeout=60 * TIME_SCALE + 20 * SIDECAR_CPU_S)
            assert proc.returncode == 0, f"burner failed: {proc.returncode}"

            # The burner is gone: the Collector ends up with exactly what the agent drained (the
            # filter selects only the burner), never more, once its last drain is exported.
            def settled() -> tuple[float, int] | None:
                received = agent.metric_value("ebpf_receiver_source_events_received_total", source="profiler")
                got = sum(c for _, _, c, _ in at_collector())
                return (received, got) if received and got == received else None

            try:
                wait_until(settled, 60, 0.5, "the Collector to hold every sample the agent drained")
            except AssertionError as e:   # say what the agent saw (the kernel matrix keeps only this)
                got = at_collector()
                raise AssertionError(
                    f"{e}; burner samples at the Collector: {sum(c for _, _, c, _ in got)} in {len(got)} "
                    f"stacks; agent: received "
                    f"{agent.metric_value('ebpf_receiver_source_events_received_total', source='profiler')}, "
                    f"sent {agent.metric_value('ebpf_receiver_exporter_sent_items_total', signal='profiles')}; "
                    f"agent log tail:\n{agent.log()[-3000:]}") from None
            # None lost in the kernel (ring buffer full, map collisions, ...) or dropped on the way.
            assert agent.metric_value("ebpf_receiver_source_events_lost_total", source="profiler") == 0
            assert agent.metric_value("ebpf_receiver_exporter_dropped_items_total", signal="profiles") == 0
            assert agent.metric_value("ebpf_receiver_source_up", source="profiler") == 1
            # Symbolization shows in the self-metrics: frames named, and the burner's files parsed.
            assert agent.metric_value("ebpf_receiver_profiler_frames_total", result="resolved") > 0
            assert agent.metric_value("ebpf_receiver_profiler_symbol_files_total", event="parsed") > 0
        finally:
            assert agent.stop() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # pprof_dir: one file per drain, each readable; together (the stop's last drain included)
    # exactly the stacks and counts the Collector received.
    from receiver.profiling.output.pprof import from_pprof, read_pprof

    files = sorted((tmp_path / "pprof").glob("cpu-*.pb.gz"))
    assert files, "no pprof written to pprof_dir"
    # Stacks as their named functions: an unnamed frame is a location without lines in OTLP
    # (no name at all there) and a location with an empty name in pprof.
    written: collections.Counter[tuple[str, ...]] = collections.Counter()
    for path in files:
        for s in from_pprof(read_pprof(path)).samples:
            assert s.pid == proc.pid, s.pid
            written[tuple(f.function for f in s.frames if f.function)] += s.count

    def exported() -> collections.Counter[tuple[str, ...]]:
        out: collections.Counter[tuple[str, ...]] = collections.Counter()
        for names, _, count, _ in at_collector():
            out[tuple(n for n in names if n)] += count
        return out

    wait_until(lambda: sum(exported().values()) >= sum(written.values()), 30, 0.2,
               "the agent's last drain at the Collector")
    assert exported() == written, (sum(exported().values()), sum(written.values()))
    counts: collections.Counter[str] = collections.Counter()
    for names, sattrs, count, res in at_collector():
        assert sattrs["thread.id"] == proc.pid and sattrs["thread.name"] == "prof_burner"
        assert sattrs["process.executable.name"] == "prof_burner"
        assert res["process.pid"] == proc.pid and res.get("host.name")
        for fn in BURNERS:
            if fn in names:
                counts[fn] += count
        if names[:1] in (["burn_a"], ["burn_b"]):
            assert names[:2] == [names[0], "main"], names   # leaf first, then its caller
    a, b = counts["burn_a"], counts["burn_b"]
    assert a and b, counts
    # 2:1 of its thread CPU time, so burn_a's share is 2/3 within sampling noise.
    assert abs(a / (a + b) - 2 / 3) <= _share_margin(2 / 3, a + b), f"burn_a:burn_b = {a}:{b}"
