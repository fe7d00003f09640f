"""JVMs as they come (issue: processes as they come): a JVM started after the profiler, and gone
before the drain, has its Java frames named; two JVMs of different JDKs side by side each have
their own methods. Real BPF, real JVMs (Debian's OpenJDK 17, Temurin 25), no JVM flags.

Each program's main thread runs under a launcher name of its own (a symlink to the JDK's
``java``: the thread keeps the comm of the executable it was started by), which the profiler's
filter selects; the JVM's own threads (compiler, GC) have their own names and are not sampled."""

from __future__ import annotations

import collections
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ..harness import wait_until
from .test_jvm_e2e import _NEVER, _compile, _jdk, _jvm
from .test_unwind_e2e import Profiled

pytestmark = [pytest.mark.bpf]


def source(cls: str, hot: str) -> str:
    """A program whose ``hot`` method sits four calls under main (runLoop -> dispatch -> stage1 ->
    hot), every method too large to inline. It runs until its main thread has used ``args[0]``
    milliseconds of CPU time, or, given ``args[1]``, until that file appears."""
    return f"""\
import java.io.File;
import java.lang.management.ManagementFactory;
import java.lang.management.ThreadMXBean;

public class {cls} {{
    static long sink;

    static long {hot}(long n, long s) {{
{_NEVER}\
        for (long i = 0; i < n; i++) {{ s = s * 31 + i; s ^= s >>> 7; }}
        return s;
    }}

    static long stage1(long n) {{
        long s = 0;
{_NEVER}\
        return {hot}(n, 1) + s;
    }}

    static long dispatch(long n) {{
        long s = 0;
{_NEVER}\
        return stage1(n) + s;
    }}

    static void runLoop(long cpuNanos, File stop) {{
        ThreadMXBean cpu = ManagementFactory.getThreadMXBean();
        long k = 0, n = 0;
{_NEVER.replace("s = s", "k = k")}\
        while (k++ % 16 != 0 || (stop == null ? cpu.getCurrentThreadCpuTime() < cpuNanos : !stop.exists()))
            sink += dispatch(20000);
    }}

    public static void main(String[] args) {{
        runLoop(Long.parseLong(args[0]) * 1000000L, args.length > 1 ? new File(args[1]) : null);
    }}
}}
"""


def chain(cls: str, hot: str) -> list[str]:
    return [f"{cls}.{hot}(long, long)", f"{cls}.stage1(long)", f"{cls}.dispatch(long)",
            f"{cls}.runLoop(long, java.io.File)", f"{cls}.main(java.lang.String[])"]


def launcher(home: Path, name: str, where: Path) -> Path:
    """``home``'s java under the comm ``name``."""
    link = where / name
    link.symlink_to(home / "bin" / "java")
    return link


def whole_chains(samples: Any, pid: int | None, want: list[str]) -> tuple[int, int, collections.Counter[Any]]:
    """(hot samples, those carrying ``want`` whole by name, the hot samples' chains)."""
    hot = whole = 0
    seen: collections.Counter[tuple[str, ...]] = collections.Counter()
    for s in samples:
        if pid is not None and s.pid != pid:
            continue
        java = _jvm(s.frames)
        if not java or java[0].function != want[0]:
            continue
        hot += s.count
        names = tuple(f.function for f in java[:len(want)])
        seen[names] += s.count
        whole += s.count if list(names) == want else 0
    return hot, whole, seen


@pytest.mark.parametrize("jdk", ["jdk17", "jdk25"])
def test_short_lived_jvm_is_named(bpf_ok: None, jdk: str, tmp_path: Path) -> None:
    """A JVM started after the profiler, burning 2 s of CPU time in one hot method and gone
    before the drain: its samples carry the Java chain by name. Its methods are named while it
    lives (a Method* is read when the kernel first reports it), and it is recognised as it comes:
    a JVM first seen before its code cache exists is looked at again until it does.

    What it asks is names, not lines: a compiled frame's inlined methods and line come from its
    nmethod's debug information, read at drain from the live process, so compiled frames of a JVM
    gone by then are their methods alone, at line 0 (interpreted frames keep theirs: the bci is
    in the sample). Every method here is too large to inline, so no frame is missing."""
    from receiver.config import ProcessFilter

    home = _jdk(jdk)
    _compile(home, source("Brief", "briefHot"), "Brief", tmp_path)
    exe = launcher(home, "jvmshort", tmp_path)
    want = chain("Brief", "briefHot")
    prof = Profiled(0, filter=ProcessFilter(process_names=["jvmshort"]))
    try:
        rt = prof.sampler.runtime("hotspot")
        assert rt is not None, "Java frames are off"
        unwinder = prof.sampler.unwinder
        assert unwinder is not None and unwinder.wait_idle(30)
        prof.sampler.drain()
        proc = subprocess.run([str(exe), "-cp", str(tmp_path), "Brief", "2000"], timeout=300,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert rt.wait_idle(10) and unwinder.wait_idle(30)
        profile = prof.sampler.drain()
        stats = prof.sampler.runtime_stats("hotspot")
    finally:
        prof.close()
    hot, whole, seen = whole_chains(profile.samples, None, want)
    total = sum(s.count for s in profile.samples)
    assert stats["processes_loaded"] >= 1, stats
    # 2 s of CPU at 99 Hz is ~200 samples, nearly all in briefHot once it runs
    assert hot >= 100, (hot, total, collections.Counter(tuple(f.function for f in _jvm(s.frames)[:2])
                                                         for s in profile.samples).most_common(8), stats)
    assert whole / hot >= 0.9, (whole, hot, seen.most_common(5), stats)
    assert stats.get("frames_unresolved", 0) == 0, stats


def test_two_jvms_side_by_side(bpf_ok: None, tmp_path: Path) -> None:
    """JDK 17 and JDK 25 at once, each running a program with hot methods of its own: each one's
    samples carry its own chain, and no frame of one is named with the other's methods."""
    from receiver.config import ProcessFilter

    programs = {"jdk17": ("Seventeen", "seventeenHot", "jvm17"), "jdk25": ("TwentyFive", "twentyFiveHot", "jvm25")}
    argv: dict[str, list[str]] = {}
    for jdk, (cls, hot, comm) in programs.items():
        home = _jdk(jdk)
        where = tmp_path / jdk
        where.mkdir()
        _compile(home, source(cls, hot), cls, where)
        argv[jdk] = [str(launcher(home, comm, where)), "-cp", str(where), cls, "0", str(tmp_path / "stop")]
    prof = None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        prof = Profiled(0, filter=ProcessFilter(process_names=[c for _, _, c in programs.values()]))
        rt = prof.sampler.runtime("hotspot")
        assert rt is not None, "Java frames are off"
        for jdk in programs:        # both started once the profiler runs
            procs[jdk] = subprocess.Popen(argv[jdk], stdout=subprocess.DEVNULL)
        wait_until(lambda: rt.stats["processes_loaded"] >= 2, 60, 0.2, "both JVMs' HotSpot entries")
        samples: list[Any] = []
        deadline = time.monotonic() + 120

        def hot_of(jdk: str) -> int:
            cls, hot, _ = programs[jdk]
            return whole_chains(samples, procs[jdk].pid, chain(cls, hot))[0]

        while time.monotonic() < deadline and min(hot_of(j) for j in programs) < 300:
            samples += prof.measure(2).samples
        stats = prof.sampler.runtime_stats("hotspot")
    finally:
        (tmp_path / "stop").touch()
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if prof is not None:
            prof.close()
    for jdk, (cls, hot, _) in programs.items():
        other = next(c for j, (c, _, _) in programs.items() if j != jdk)
        pid = procs[jdk].pid
        n, whole, seen = whole_chains(samples, pid, chain(cls, hot))
        assert n >= 300, (jdk, n, stats)
        assert whole / n >= 0.95, (jdk, whole, n, seen.most_common(5), stats)
        ours = [s for s in samples if s.pid == pid]
        strays = collections.Counter(f.function for s in ours for f in _jvm(s.frames) if other in f.function)
        assert not strays, (jdk, strays)
        mine = sum(s.count for s in ours for f in _jvm(s.frames) if f.function.startswith(f"{cls}."))
        assert mine > 0
    assert stats.get("frames_unresolved", 0) == 0, stats


def test_starting_jvm_is_looked_at_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A java launcher without libjvm yet is reloaded until it is a JVM, YOUNG_LOOKS times at most;
    a process gone meanwhile is dropped, and a process that is no launcher is not looked at."""
    import os

    from receiver.profiling.runtimes import hotspot

    monkeypatch.setattr(hotspot, "YOUNG_FIRST_S", 0.001)
    monkeypatch.setattr(hotspot, "YOUNG_MAX_S", 0.001)
    rt = hotspot.HotSpot(None)
    reloaded: list[int] = []
    launcher = [(0x1000, 0x2000, 0, "/usr/lib/jvm/jdk/bin/java", "", False)]

    def reload(pid: int) -> None:
        reloaded.append(pid)
        assert rt.recognise(pid, launcher) is None        # still starting: looked at again

    rt.reload = reload
    assert rt.recognise(os.getpid(), launcher) is None
    wait_until(lambda: rt.stats["young_given_up"] == 1, 30, 0.01, "the looks to end")
    assert reloaded == [os.getpid()] * hotspot.YOUNG_LOOKS
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert rt.recognise(gone.pid, launcher) is None
    assert rt.recognise(os.getpid(), [(0x1000, 0x2000, 0, "/usr/bin/python3", "", False)]) is None
    wait_until(lambda: not rt._timers, 30, 0.01, "the timers")
    assert reloaded == [os.getpid()] * hotspot.YOUNG_LOOKS and not rt._young
    rt.stop()
