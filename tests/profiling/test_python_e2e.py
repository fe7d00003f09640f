"""CPython frames in CPU profiles: real BPF, real interpreters (Debian's stripped, statically
linked /usr/bin/python3.11 and pyenv's shared-libpython 3.11 build), real workloads.

Each test starts its workload, lets the profiler load the process's unwind tables and
interpreter entry, drops what was counted so far, then measures (``Profiled`` of the unwind
tests)."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, go_env, wait_until
from .runtime_support import otlp_frames, samples_until
from .test_unwind_e2e import Profiled, profiled

pytestmark = [pytest.mark.bpf]

DEBIAN = "/usr/bin/python3"
PYENV = "/root/.pyenv/versions/3.11.7/bin/python3.11"
PYENV_312 = "/root/.pyenv/versions/3.12.1/bin/python3.12"   # offsets from the table
PYENV_313 = "/root/.pyenv/versions/3.13.0/bin/python3.13"   # offsets from _Py_DebugOffsets
EVAL = "_PyEval_EvalFrameDefault"

# hot_a runs three times as long as hot_b, both under a chain of six Python functions.
SPLIT_SOURCE = """\
import sys, time


def hot_a(n):
    s = 0
    for i in range(n):
        s += i * i  # LINE hot_a
    return s


def hot_b(n):
    s = 0
    for i in range(n):
        s += i * i  # LINE hot_b
    return s


def level5(n):
    for _ in range(3):  # the same work three times: ints of the same sizes cost the same
        hot_a(n)  # CALL hot_a
    hot_b(n)  # CALL hot_b


def level4(n):
    level5(n)  # CALL level5


def level3(n):
    level4(n)  # CALL level4


def level2(n):
    level3(n)  # CALL level3


def level1(n):
    level2(n)  # CALL level2


clock = time.process_time if sys.argv[2:] == ["cpu"] else time.time   # seconds of CPU or of wall
end = clock() + float(sys.argv[1])
while clock() < end:
    level1(20000)  # CALL level1
"""

# Native code under Python (hashlib and zlib on big buffers, the GIL released), and native code
# calling back into Python (sorted with a Python key function).
NATIVE_SOURCE = """\
import hashlib, sys, time, zlib

DATA = bytes(range(256)) * (1 << 14)


def do_hash():
    h = hashlib.sha256()
    for _ in range(4):
        h.update(DATA)
    return h.digest()


def do_zlib():
    return zlib.compress(DATA, 9)


def key(x):
    s = 0
    for i in range(200):
        s += i ^ x
    return -s


def do_sort():
    return sorted(range(2000), key=key)


def outer(f):
    return f()


end = time.time() + float(sys.argv[1])
while time.time() < end:
    outer(do_hash)
    outer(do_zlib)
    outer(do_sort)
"""


def _lines(source: str) -> dict[str, int]:
    """Line numbers of the ``# LINE name`` / ``# CALL name`` markers."""
    out = {}
    for i, text in enumerate(source.splitlines(), 1):
        m = re.search(r"# (LINE|CALL) (\w+)", text)
        if m:
            out[f"{m[1]} {m[2]}"] = i
    return out


def _interpreter(path: str) -> str:
    if not Path(path).exists():
        pytest.fail(f"{path} is not installed")
    return path


def _warm_python(prof: Profiled) -> None:
    prof.warm()
    python = prof.sampler.runtime("cpython")
    assert python is not None, "Python frames are off"
    wait_until(lambda: python.stats["processes_loaded"] >= 1, 30, 0.2, "the interpreter entry")
    prof.sampler.drain()


def _python(frames: Any) -> list[Any]:
    return [f for f in frames if f.frame_type == "cpython"]


@pytest.mark.parametrize("interpreter", [DEBIAN, PYENV, PYENV_312, PYENV_313],
                         ids=["debian", "pyenv", "pyenv-3.12", "pyenv-3.13"])
def test_split_and_whole_python_chain(bpf_ok: None, interpreter: str, tmp_path: Path) -> None:
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SOURCE)
    lines = _lines(SPLIT_SOURCE)
    with profiled(_interpreter(interpreter), str(script), "600") as (_, prof):
        _warm_python(prof)
        # Until 300 hot samples (5 s on an idle core; longer when the machine is busy).
        samples = samples_until(prof, 400, 60)
        stats = prof.sampler.runtime_stats("cpython")
    hot = collections.Counter()
    whole = 0
    for s in samples:
        py = _python(s.frames)
        if not py or py[0].function not in ("hot_a", "hot_b"):
            continue
        leaf = py[0].function
        hot[leaf] += s.count
        expected = [(leaf, lines[f"LINE {leaf}"] - 2, lines[f"LINE {leaf}"]),   # loop header or body
                    ("level5", lines[f"CALL {leaf}"]), ("level4", lines["CALL level5"]),
                    ("level3", lines["CALL level4"]), ("level2", lines["CALL level3"]),
                    ("level1", lines["CALL level2"]), ("<module>", lines["CALL level1"])]
        got = [(f.function, f.line) for f in py]
        ok = (len(got) == len(expected) and got[0][0] == leaf and expected[0][1] <= got[0][1] <= expected[0][2]
              and got[1:] == expected[1:] and all(f.file == str(script) for f in py))
        # The Python run sits just above the eval loop's native frame that evaluates it.
        at = s.frames.index(py[-1])
        ok = ok and at + 1 < len(s.frames) and s.frames[at + 1].function == EVAL
        whole += s.count if ok else 0
    total = hot["hot_a"] + hot["hot_b"]
    assert total >= 300, (hot, stats)
    share = hot["hot_a"] / total
    assert 0.75 - 0.07 <= share <= 0.75 + 0.07, (hot, stats)     # 3:1, within sampling noise
    assert whole / total >= 0.95, (whole, total, stats)
    assert stats.get("frames_unresolved", 0) == 0 and stats["walked"] > 0, stats


def test_native_code_under_python_and_python_called_from_native(bpf_ok: None, tmp_path: Path) -> None:
    script = tmp_path / "native.py"
    script.write_text(NATIVE_SOURCE)
    with profiled(_interpreter(DEBIAN), str(script), "60") as (_, prof):
        _warm_python(prof)
        profile = prof.measure(6)
    under = collections.Counter()      # caller → samples with native frames above its Python frames
    good = collections.Counter()
    callbacks = good_callbacks = 0
    for s in profile.samples:
        user = [f for f in s.frames if f.frame_type != "kernel"]
        py = _python(user)
        if not py:
            continue
        first = user.index(py[0])
        names = [f.function for f in py]
        if py[0].function in ("do_hash", "do_zlib") and first > 0:
            under[py[0].function] += s.count
            # A stack whose native walk stopped early ends at <module>: counted, and not good.
            below = user[first + 3:first + 4]
            if names == [py[0].function, "outer", "<module>"] and below and below[0].function == EVAL:
                good[py[0].function] += s.count
        if py[0].function == "key":
            # key → eval loop → sorted's native code → do_sort → outer → <module> → eval loop
            callbacks += s.count
            after = [f.function for f in user[first:]]
            i = after.index("do_sort") if "do_sort" in after else -1
            between = user[first + 2:first + i]
            if (i > 2 and after[1] == EVAL and between and all(f.frame_type == "native" for f in between)
                    and after[i:i + 3] == ["do_sort", "outer", "<module>"] and after[i + 3] == EVAL):
                good_callbacks += s.count
    assert under["do_hash"] >= 30 and under["do_zlib"] >= 30, under
    for fn in ("do_hash", "do_zlib"):
        assert good[fn] / under[fn] >= 0.9, (fn, good, under)
    assert callbacks >= 20 and good_callbacks / callbacks >= 0.9, (good_callbacks, callbacks)


def test_short_lived_process_is_named(bpf_ok: None, tmp_path: Path) -> None:
    """A process that exits before the drain still has its Python frames named: code objects are
    read when the kernel first reports them."""
    exe = tmp_path / "pyshort"              # a comm of its own, for the filter
    shutil.copy("/usr/bin/python3.11", exe)
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SOURCE)
    from receiver.config import ProcessFilter

    prof = Profiled(0, filter=ProcessFilter(process_names=["pyshort"]))
    try:
        # 3 s of CPU time: 3 s on the wall gave a loaded runner's process too few samples (CI).
        subprocess.run([str(exe), str(script), "3", "cpu"], check=True, timeout=300)
        assert prof.sampler.runtime("cpython") is not None and prof.sampler.runtime("cpython").wait_idle(5)
        profile = prof.sampler.drain()
        stats = prof.sampler.runtime_stats("cpython")
    finally:
        prof.close()
    py_frames = [f for s in profile.samples for f in _python(s.frames) for _ in range(s.count)]
    assert len(py_frames) >= 100, len(py_frames)
    named = [f for f in py_frames if f.function and f.file == str(script)]
    assert len(named) / len(py_frames) >= 0.95, (collections.Counter(f.function for f in py_frames), stats)
    assert {"hot_a", "hot_b", "level1", "<module>"} <= {f.function for f in named}


def test_notices_reach_user_space_past_unread_whole_samples(bpf_ok: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole samples (stack maps full) are left unread on purpose, and the ring buffer wakes its
    reader on a plain commit only when everything before was read. The notices that must be read
    while a process lives (new process, new code object) force the wake-up: a Python process
    started behind unread whole samples has its code objects named while it runs.

    The process runs until they are all named (or the wait times out): nothing else wakes the
    reader here, so without the forced wake-ups they never are. (It used to run 3 s of wall time,
    which a loaded runner could leave too little CPU for its tables to load and every function to
    be sampled before it exited, and the filler and it too few samples for the 100 whole ones.)"""
    from receiver.config import ProcessFilter
    from receiver.profiling.sampler import CpuSampler

    # Whole samples never wake the reader by themselves here (the agent wakes it every few).
    monkeypatch.setattr(CpuSampler, "_wake_every", staticmethod(lambda: 1 << 30))
    filler, short = tmp_path / "pyfill", tmp_path / "pyshort"
    for exe in (filler, short):
        shutil.copy("/usr/bin/python3.11", exe)
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SOURCE)
    # The same functions, run until a file appears.
    until = tmp_path / "until_stopped.py"
    until_source = SPLIT_SOURCE.replace("import sys, time", "import os, sys, time").replace(
        "end = clock() + float(sys.argv[1])\nwhile clock() < end:", "while not os.path.exists(sys.argv[1]):")
    assert "os.path.exists" in until_source, "SPLIT_SOURCE's loop changed: update the replacement"
    until.write_text(until_source)
    stop = tmp_path / "stop"
    functions = {"<module>", "level1", "level2", "level3", "level4", "level5", "hot_a", "hot_b"}
    fill = subprocess.Popen([str(filler), str(script), "3600"], stdout=subprocess.DEVNULL)
    prof = proc = None
    try:
        prof = Profiled(0, filter=ProcessFilter(process_names=["pyfill", "pyshort"]), max_stacks=64)
        sampler = prof.sampler
        # The filler's distinct stacks fill the 64-entry maps: later samples go whole, unread.
        wait_until(lambda: sampler.stats()["recorded"] >= 20, 120, 0.2, "whole samples")
        assert sampler.runtime("cpython") is not None
        learned: collections.Counter[tuple[int, str | None]] = collections.Counter()
        learn = type(sampler.runtime("cpython").codes).learn

        def spy(self: Any, pid: int, code: int, interp: Any) -> Any:
            named = learn(self, pid, code, interp)
            learned[(pid, named.qualname if named is not None else None)] += 1
            return named

        monkeypatch.setattr(type(sampler.runtime("cpython").codes), "learn", spy)
        proc = subprocess.Popen([str(short), str(until), str(stop)], stdout=subprocess.DEVNULL)
        pid = proc.pid

        def named() -> set[str | None]:
            return {name for (p, name) in list(learned) if p == pid and name is not None}

        # Its code objects read while it lives, behind many whole samples left unread.
        try:
            wait_until(lambda: functions <= named() and sampler.stats()["recorded"] >= 100, 120, 0.2,
                       "the short process's functions named and 100 whole samples")
        except AssertionError as e:
            raise AssertionError(f"{e}: named {sorted(map(str, named()))}, whole samples "
                                 f"{sampler.stats()['recorded']}, alive {proc.poll() is None}") from None
        assert proc.poll() is None, "the process ended before it was stopped"
        stop.touch()
        assert proc.wait(60) == 0
    finally:
        stop.touch()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if prof is not None:
            prof.close()
        fill.kill()
        fill.wait()


def test_pprof_shows_python_functions_with_lines(bpf_ok: None, tmp_path: Path) -> None:
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SOURCE)
    with profiled(_interpreter(DEBIAN), str(script), "60") as (_, prof):
        _warm_python(prof)
        profile = prof.measure(3)
    from receiver.profiling.output.pprof import from_pprof, read_pprof, write_pprof

    path = tmp_path / "cpu.pb.gz"
    write_pprof(profile, path)
    back = {(f.function, f.file, f.frame_type) for s in from_pprof(read_pprof(path)).samples for f in s.frames}
    assert ("hot_a", str(script), "cpython") in back
    p = subprocess.run(["go", "tool", "pprof", "-top", "-lines", "-cum", "-symbolize=none", str(path)],
                       capture_output=True, text=True, env=go_env(tmp_path), timeout=240, check=False)
    assert p.returncode == 0, p.stderr
    line = _lines(SPLIT_SOURCE)["CALL level1"]
    assert re.search(rf"<module> .*split\.py:{line}\b", p.stdout), p.stdout[:3000]
    assert re.search(r"\blevel5 .*split\.py:\d+", p.stdout), p.stdout[:3000]


def test_collector_receives_cpython_frames(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SOURCE)
    proc = subprocess.Popen([DEBIAN, str(script), "120"], stdout=subprocess.DEVNULL)
    try:
        cfg = {"preset": "development", "report_interval": "2s", "filter": {"pids": [proc.pid]}}
        agent = Agent(tmp_path, agent_config(collector, {"profiler": cfg})).start()
        try:
            def python_frames() -> list[tuple[str, str, int]]:
                got = [f for f in otlp_frames(collector, "cpython")]
                return got if sum(1 for name, _, _ in got if name == "hot_a") >= 20 else []

            frames = wait_until(python_frames, 90, 0.5, "cpython frames in profiles.jsonl")
            assert agent.metric_value("ebpf_receiver_profiler_python_frames_total", result="resolved") > 0
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()
    lines = _lines(SPLIT_SOURCE)
    assert ("level5", str(script), lines["CALL hot_a"]) in frames
    assert ("<module>", str(script), lines["CALL level1"]) in frames
