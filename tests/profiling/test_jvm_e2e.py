"""Java (HotSpot) frames in CPU profiles: real BPF, real JVMs (Debian's OpenJDK 17 and Temurin 25
under /usr/lib/jvm), programs compiled with the JDK's own javac and started with no flags (or only
the flags a test is about: -Xint, -XX:-TieredCompilation).

Each test starts its workload, lets the profiler load the process's tables and HotSpot entry,
waits until its samples carry Java frames, drops what was counted so far, then measures
(``Profiled`` of the unwind tests). Compiled frames are at their lines (the nmethod's scopes at
the pc) as interpreted ones are (the bci); methods C2 inlines are frames of their own
(``test_inlined_methods_are_frames_with_lines``; the other programs keep their methods too large
to inline). A JVM in the compose workload container is tests/test_deploy_compose.py's."""

from __future__ import annotations

import collections
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .runtime_support import of_type, samples_until, warm_runtime
from .test_unwind_e2e import Profiled

pytestmark = [pytest.mark.bpf]

JDKS = {"jdk17": Path("/usr/lib/jvm/java-17-openjdk-amd64"), "jdk25": Path("/usr/lib/jvm/temurin-25-jdk-amd64")}

# A branch that never runs, making a method's bytecode larger than C2 inlines at a hot call site
# (FreqInlineSize, 325 bytes): inlined methods as frames of their own are not done yet.
_NEVER = "        if (n < 0) {\n" + "".join(f"            s = s * {k}L + {k + 1}L;\n" for k in range(2, 70)) \
    + "        }\n"

# javaHotA runs three times the work of javaHotB, both five calls under main (runLoop -> dispatch
# -> stage1 -> stage2). The program measures the time it spends in each itself and prints it when
# the stop file appears.
SPLIT_SOURCE = """\
import java.io.File;

public class Hot {
    static long spentA, spentB, sink;

    static long javaHotA(long n, long s) {
""" + _NEVER + """\
        for (long i = 0; i < n; i++) { s = s * 31 + i; s ^= s >>> 7; } // LINE javaHotA
        return s;
    }

    static long javaHotB(long n, long s) {
""" + _NEVER + """\
        for (long i = 0; i < n; i++) { s = s * 31 + i; s ^= s >>> 7; } // LINE javaHotB
        return s;
    }

    static long stage2(long n) {
        long s = 0;
""" + _NEVER + """\
        long t = System.nanoTime();
        s += javaHotA(3 * n, 1); // LINE stage2>A
        long m = System.nanoTime();
        s += javaHotB(n, 2); // LINE stage2>B
        spentA += m - t;
        spentB += System.nanoTime() - m;
        return s;
    }

    static long stage1(long n) {
        long s = 0;
""" + _NEVER + """\
        return stage2(n) + s; // LINE stage1
    }

    static long dispatch(long n) {
        long s = 0;
""" + _NEVER + """\
        return stage1(n) + s; // LINE dispatch
    }

    static void runLoop(String stop) {
        File f = new File(stop);
        long k = 0, n = 0;
""" + _NEVER.replace("s = s", "k = k") + """\
        while (k++ % 16 != 0 || !f.exists()) sink += dispatch(20000); // LINE runLoop
        System.out.println(spentA + " " + spentB);
    }

    public static void main(String[] args) {
        runLoop(args[0]); // LINE main
    }
}
"""

CHAIN = ["Hot.stage2(long)", "Hot.stage1(long)", "Hot.dispatch(long)", "Hot.runLoop(java.lang.String)",
         "Hot.main(java.lang.String[])"]
HOT = {"A": "Hot.javaHotA(long, long)", "B": "Hot.javaHotB(long, long)"}

# A method compiled for one receiver class, then handed others: its speculation fails (an
# uncommon trap deoptimizes it) and it is compiled again, round after round, while profiled. Every
# frame must still carry the name of the method it ran.
DEOPT_SOURCE = """\
import java.io.File;

public class Deopt {
    interface Shape { long area(long n); }
    static final class Square implements Shape { public long area(long n) { return n * n; } }
    static final class Line implements Shape { public long area(long n) { return n + 1; } }
    static final class Dot implements Shape { public long area(long n) { return 1; } }
    static long sink;

    static long flip(Shape shape, long n) {
        long s = 0;
""" + _NEVER + """\
        for (long i = 0; i < n; i++) s += shape.area(i) ^ (s >>> 3);
        return s;
    }

    static long steady(long n) {
        long s = 0;
""" + _NEVER + """\
        for (long i = 0; i < n; i++) { s = s * 31 + i; s ^= s >>> 7; }
        return s;
    }

    static void driver(long round) {
        Shape[] shapes = { new Square(), new Line(), new Dot() };
        sink += flip(shapes[(int) (round / 200 % 3)], 200000);
        sink += steady(200000);
    }

    public static void main(String[] args) {
        File f = new File(args[0]);
        long round = 0;
        while (round % 64 != 0 || !f.exists()) driver(round++);
    }
}
"""


def _lines(source: str) -> dict[str, int]:
    """Line numbers of the ``// LINE name`` markers."""
    return {m[1]: i for i, text in enumerate(source.splitlines(), 1) if (m := re.search(r"// LINE (\S+)", text))}


def _jdk(name: str) -> Path:
    home = JDKS[name]
    if not (home / "bin" / "javac").exists():
        pytest.fail(f"{home} has no javac")
    return home


def _compile(home: Path, source: str, cls: str, where: Path, *flags: str) -> None:
    (where / f"{cls}.java").write_text(source)
    p = subprocess.run([str(home / "bin" / "javac"), *flags, "-d", str(where), str(where / f"{cls}.java")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]


def _jvm(frames: Any) -> list[Any]:
    return of_type(frames, "jvm")


def _warm_jvm(prof: Profiled) -> None:
    warm_runtime(prof, "hotspot", "jvm", "Java", "HotSpot")


def _profile(argv: list[str], stop: Path, want: int) -> tuple[list[Any], dict[str, int], str]:
    """Runs ``argv`` profiled until ``want`` samples are counted: the samples, the runtime's
    counters, and what the program printed once the stop file appeared."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    prof = None
    try:
        prof = Profiled(proc.pid)
        _warm_jvm(prof)
        samples = samples_until(prof, want, 90)
        stats = prof.sampler.runtime_stats("hotspot")
        stop.touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        if prof is not None:
            prof.close()
        stop.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return samples, stats, out.decode()


def _check_split(samples: list[Any], stats: dict[str, int], out: str, lines: bool = False) -> None:
    """The 3:1 split with the whole chain by name (and, ``lines``: every frame at its line)."""
    at = _lines(SPLIT_SOURCE)
    hot: collections.Counter[str] = collections.Counter()
    whole = lined = total = 0
    for s in samples:
        total += s.count
        java = _jvm(s.frames)
        leaf = next((k for k, name in HOT.items() if java and java[0].function == name), None)
        if leaf is None:
            continue
        hot[leaf] += s.count
        # the whole chain by name, and the Java leaf is the innermost user frame
        user = [f for f in s.frames if f.frame_type != "kernel"]
        ok = [f.function for f in java[:6]] == [HOT[leaf], *CHAIN] and user[0] is java[0]
        ok = ok and java[0].file == "Hot.java"
        whole += s.count if ok else 0
        # (a sample at a method's first bytecodes, the never-taken branch, is at that line: 90 %)
        want = [at[f"javaHot{leaf}"], at[f"stage2>{leaf}"], at["stage1"], at["dispatch"], at["runLoop"], at["main"]]
        lined += s.count if ok and [f.line for f in java[:6]] == want else 0
    hot_total = hot["A"] + hot["B"]
    assert hot_total >= 300 and hot_total >= 0.9 * total, (hot, total, stats)
    assert whole / hot_total >= 0.95, (whole, hot_total, stats)
    if lines:
        assert lined / hot_total >= 0.9, (lined, hot_total, stats)
    spent_a, spent_b = (int(v) for v in out.split())
    share, own_share = hot["A"] / hot_total, spent_a / (spent_a + spent_b)
    assert abs(share - own_share) <= 0.1 * own_share, (hot, out, stats)
    assert stats.get("frames_unresolved", 0) == 0 and stats["frames_resolved"] > 0, stats


@pytest.mark.parametrize("jdk", ["jdk17", "jdk25"])
def test_split_and_whole_java_chain(bpf_ok: None, jdk: str, tmp_path: Path) -> None:
    home = _jdk(jdk)
    _compile(home, SPLIT_SOURCE, "Hot", tmp_path)
    stop = tmp_path / "stop"
    samples, stats, out = _profile([str(home / "bin" / "java"), "-cp", str(tmp_path), "Hot", str(stop)], stop, 400)
    _check_split(samples, stats, out, lines=True)
    assert stats["compiled"] > 0, stats


@pytest.mark.parametrize("flag", ["-Xint", "-XX:-TieredCompilation"])
@pytest.mark.parametrize("jdk", ["jdk17", "jdk25"])
def test_interpreter_only_and_c2_only(bpf_ok: None, jdk: str, flag: str, tmp_path: Path) -> None:
    home = _jdk(jdk)
    _compile(home, SPLIT_SOURCE, "Hot", tmp_path)
    stop = tmp_path / "stop"
    samples, stats, out = _profile([str(home / "bin" / "java"), flag, "-cp", str(tmp_path), "Hot", str(stop)],
                                   stop, 400)
    _check_split(samples, stats, out, lines=True)   # interpreted frames: by bci; compiled: by scope
    if flag == "-Xint":
        assert stats["interpreted"] > 0 and stats["compiled"] == 0, stats
    else:
        assert stats["compiled"] > 0, stats


@pytest.mark.parametrize("jdk", ["jdk17", "jdk25"])
def test_deoptimized_method_keeps_its_name(bpf_ok: None, jdk: str, tmp_path: Path) -> None:
    home = _jdk(jdk)
    _compile(home, DEOPT_SOURCE, "Deopt", tmp_path)
    java = [str(home / "bin" / "java"), "-cp", str(tmp_path), "Deopt"]
    # The workload does deoptimize (shown once with the JVM's own log, outside the profiled run).
    stop = tmp_path / "stop-trace"
    trace = subprocess.Popen([java[0], "-XX:+UnlockDiagnosticVMOptions", "-XX:+LogCompilation",
                              f"-XX:LogFile={tmp_path / 'compilation.log'}", *java[1:], str(stop)])
    time.sleep(8)
    stop.touch()
    trace.wait(timeout=60)
    log = (tmp_path / "compilation.log").read_text(errors="replace")
    assert "uncommon_trap" in log and "Deopt flip" in log, log[-2000:]

    stop = tmp_path / "stop"
    samples, stats, _ = _profile([*java, str(stop)], stop, 300)
    ours: collections.Counter[str] = collections.Counter()
    chains: collections.Counter[tuple[str, ...]] = collections.Counter()
    known = {"Deopt.flip(Deopt$Shape, long)", "Deopt.steady(long)", "Deopt.driver(long)",
             "Deopt.main(java.lang.String[])", "Deopt$Square.area(long)", "Deopt$Line.area(long)",
             "Deopt$Dot.area(long)"}
    for s in samples:
        java = _jvm(s.frames)
        for f in java:
            if f.function.startswith("Deopt"):
                ours[f.function] += s.count
        chains[tuple(f.function for f in java[:3])] += s.count
    # every frame of the program is one of its methods, and each stands under its own caller
    assert set(ours) <= known, (ours, stats)
    assert ours["Deopt.flip(Deopt$Shape, long)"] >= 30 and ours["Deopt.steady(long)"] >= 30, (ours, stats)
    for chain, n in chains.items():
        if chain and chain[0] in ("Deopt.flip(Deopt$Shape, long)", "Deopt.steady(long)"):
            assert chain[1:] == ("Deopt.driver(long)", "Deopt.main(java.lang.String[])"), (chain, n, stats)
    assert stats.get("frames_unresolved", 0) == 0, stats


# work stays a method of its own (too large to inline); mid and outer are small and hot, and C2
# inlines mid into outer (and outer into runLoop's compiled loop). Each compiled pc's scopes give
# the inlined methods as frames of their own, innermost first, each at its line. Compiled with -g.
INLINE_SOURCE = """\
import java.io.File;

public class Inline {
    static long sink;

    static long work(long n, long s) {
""" + _NEVER + """\
        for (long i = 0; i < n; i++) { s = s * 31 + i; s ^= s >>> 7; } // LINE work
        return s;
    }

    static long mid(long n) {
        return work(n, n) + 1; // LINE mid
    }

    static long outer(long n) {
        return mid(n) ^ n; // LINE outer
    }

    static void runLoop(String stop) {
        File f = new File(stop);
        long k = 0;
        while (k++ % 16 != 0 || !f.exists()) sink += outer(20000); // LINE runLoop
    }

    public static void main(String[] args) {
        runLoop(args[0]); // LINE main
    }
}
"""

INLINE_CHAIN = ["Inline.work(long, long)", "Inline.mid(long)", "Inline.outer(long)",
                "Inline.runLoop(java.lang.String)", "Inline.main(java.lang.String[])"]


@pytest.mark.parametrize("jdk", ["jdk17", "jdk25"])
def test_inlined_methods_are_frames_with_lines(bpf_ok: None, jdk: str, tmp_path: Path) -> None:
    home = _jdk(jdk)
    _compile(home, INLINE_SOURCE, "Inline", tmp_path, "-g")
    java = [str(home / "bin" / "java"), "-cp", str(tmp_path), "Inline"]
    # C2 does inline mid (shown once with the JVM's own log, outside the profiled run)
    stop = tmp_path / "stop-trace"
    trace = subprocess.Popen([java[0], "-XX:+UnlockDiagnosticVMOptions", "-XX:+PrintInlining", *java[1:], str(stop)],
                             stdout=subprocess.PIPE, text=True)
    time.sleep(6)
    stop.touch()
    printed, _ = trace.communicate(timeout=60)
    assert re.search(r"Inline::mid .*inline \(hot\)", printed), printed[-3000:]
    stop = tmp_path / "stop"
    samples, stats, _ = _profile([*java, str(stop)], stop, 400)
    at = _lines(INLINE_SOURCE)
    want_lines = [at["work"], at["mid"], at["outer"], at["runLoop"], at["main"]]
    hot = whole = lined = 0
    seen: collections.Counter[tuple[tuple[str, int], ...]] = collections.Counter()
    for s in samples:
        java_frames = _jvm(s.frames)
        if not java_frames or java_frames[0].function != INLINE_CHAIN[0]:
            continue
        hot += s.count
        seen[tuple((f.function, f.line) for f in java_frames[:5])] += s.count
        if [f.function for f in java_frames[:5]] == INLINE_CHAIN:
            whole += s.count
            lined += s.count if [f.line for f in java_frames[:5]] == want_lines else 0
    assert hot >= 300, (hot, stats)
    assert whole / hot >= 0.95, (whole, hot, seen.most_common(5), stats)
    assert lined / hot >= 0.9, (lined, hot, want_lines, seen.most_common(5), stats)
    assert stats["inlined_resolved"] > 0 and stats.get("inlined_unresolved", 0) == 0, stats


# main -> runLoop -> callNative -> (JNI) Java_Jni_nativeMid in a C library -> CallStaticLongMethod
# -> javaHot: Java frames, the VM's and the library's native frames, and Java frames again.
JNI_SOURCE = """\
import java.io.File;

public class Jni {
    static { System.loadLibrary("jnimid"); }
    static long sink;
    static native long nativeMid(long n);

    static long javaHot(long n) {
        long s = 0;
        for (long i = 0; i < n; i++) { s = s * 31 + i; s ^= s >>> 7; }
        return s;
    }

    static long callNative(long n) { return nativeMid(n) + 1; }

    static void runLoop(String stop) {
        File f = new File(stop);
        long k = 0;
        while (k++ % 16 != 0 || !f.exists()) sink += callNative(200000);
    }

    public static void main(String[] args) { runLoop(args[0]); }
}
"""

JNI_C = """\
#include <jni.h>

JNIEXPORT jlong JNICALL Java_Jni_nativeMid(JNIEnv *env, jclass cls, jlong n) {
    jmethodID hot = (*env)->GetStaticMethodID(env, cls, "javaHot", "(J)J");
    return (*env)->CallStaticLongMethod(env, cls, hot, n) + 1;
}
"""


@pytest.mark.parametrize("jdk", ["jdk17", "jdk25"])
def test_jni_native_and_java_frames_in_one_stack(bpf_ok: None, jdk: str, tmp_path: Path) -> None:
    home = _jdk(jdk)
    _compile(home, JNI_SOURCE, "Jni", tmp_path)
    (tmp_path / "jnimid.c").write_text(JNI_C)
    p = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{home / 'include'}", f"-I{home / 'include' / 'linux'}",
                        "-o", str(tmp_path / "libjnimid.so"), str(tmp_path / "jnimid.c")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    stop = tmp_path / "stop"
    samples, stats, _ = _profile([str(home / "bin" / "java"), f"-Djava.library.path={tmp_path}", "-cp", str(tmp_path),
                                  "Jni", str(stop)], stop, 300)
    want = ["Jni.javaHot(long)", "Java_Jni_nativeMid", "Jni.callNative(long)", "Jni.runLoop(java.lang.String)",
            "Jni.main(java.lang.String[])"]
    hot = whole = 0
    for s in samples:
        user = [f for f in s.frames if f.frame_type != "kernel"]
        if not user or user[0].function != want[0]:
            continue
        hot += s.count
        names = [f.function for f in user]
        at = [names.index(w) if w in names else -1 for w in want]
        ok = all(i >= 0 for i in at) and at == sorted(at) and user[at[1]].frame_type == "native"
        ok = ok and all(user[i].frame_type == "jvm" for i in (at[0], *at[2:]))
        whole += s.count if ok else 0
    assert hot >= 200, (hot, stats)
    assert whole / hot >= 0.9, (whole, hot, stats)
