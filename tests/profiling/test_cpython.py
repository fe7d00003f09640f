"""CPython frame support without BPF: the line table reader against CPython's own, the
per-version layouts against live interpreters (3.13's published debug offsets included), code
objects read out of a live process, stack interleaving, and the writers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from receiver.profiling.model import CpuProfile, Frame, Mapping, StackSample
from receiver.profiling.runtimes import cpython

INTERPRETERS = {
    "debian-3.11": ("/usr/bin/python3.11", (3, 11)),
    "pyenv-3.11": ("/root/.pyenv/versions/3.11.7/bin/python3.11", (3, 11)),
    "pyenv-3.12": ("/root/.pyenv/versions/3.12.1/bin/python3.12", (3, 12)),
    "pyenv-3.13": ("/root/.pyenv/versions/3.13.0/bin/python3.13", (3, 13)),
}

# Prints the addresses of two code objects, then waits to be read.
CHILD = """\
import sys, time
class Box:
    def m\u00e9thode(self):
        return 1
def plain():
    x = 1
    return x
print(id(Box.m\u00e9thode.__code__), id(plain.__code__), flush=True)
time.sleep(60)
"""


def _sample_function(a: int) -> int:
    total = 0
    for i in range(a):
        if i % 3:
            total += i
        else:
            total -= 1
    try:
        total //= a
    except ZeroDivisionError:
        total = -1
    return total


@pytest.mark.skipif(sys.version_info[:2] not in cpython.LAYOUTS, reason="a CPython with the 3.11+ line table")
@pytest.mark.parametrize("fn", [_sample_function, cpython.parse_linetable, cpython.interleave])
def test_linetable_matches_co_lines(fn: object) -> None:
    code = fn.__code__  # type: ignore[attr-defined]
    named = cpython._Code("", "", code.co_firstlineno,
                          tuple(cpython.parse_linetable(code.co_linetable, code.co_firstlineno)))
    checked = 0
    for start, end, line in code.co_lines():
        for offset in range(start, end, 2):
            assert named.line_at(offset) == (line if line is not None else code.co_firstlineno), offset
            checked += 1
    assert checked > 10
    assert named.line_at(cpython.LASTI_UNKNOWN) == code.co_firstlineno


def _child(path: str, tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    if not Path(path).exists():
        pytest.fail(f"{path} is not installed")
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    proc = subprocess.Popen([path, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, [int(x) for x in proc.stdout.readline().split()]


@pytest.mark.parametrize("name", list(INTERPRETERS))
def test_live_interpreter_layout_and_code_objects(name: str, tmp_path: Path) -> None:
    from receiver.profiling.symbols.symbolizer import Symbolizer

    path, version = INTERPRETERS[name]
    proc, codes = _child(path, tmp_path)
    try:
        symbolizer = Symbolizer()
        symbolizer.note_process(proc.pid)
        interp = cpython.find_interpreter(proc.pid, symbolizer.executable_regions(proc.pid), {})
        assert interp is not None and interp.version[:2] == version and interp.code_type
        # 3.13 publishes its offsets: they must be the table's.
        assert interp.layout == cpython.LAYOUTS[version]
        names = cpython.CodeNames()
        method, plain = (names.learn(proc.pid, c, interp) for c in codes)
        assert method is not None and plain is not None
        assert (method.qualname, method.firstlineno) == ("Box.m\u00e9thode", 3)
        assert (plain.qualname, plain.filename, plain.firstlineno) == ("plain", str(tmp_path / "child.py"), 5)
        assert {line for _, _, line in plain.lines} >= {6, 7}
        # Not a code object (the type check): unresolved, counted
        assert names.learn(proc.pid, interp.runtime, interp) is None
        assert names.stats["codes_unreadable"] == 1 and names.stats["codes_read"] == 2
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_layout_from_debug_offsets() -> None:
    values = list(range(100, 100 + 44))
    blob = cpython.DEBUG_COOKIE + b"".join(v.to_bytes(8, "little") for v in values[1:])
    lay = cpython.layout_from_debug_offsets(blob, cpython.LAYOUTS[(3, 13)])
    assert lay.interpreters_head == 105 and lay.threads_head == 109 and lay.ts_frame == 123
    assert lay.code_adaptive == 143 and lay.frame_in_cframe == cpython.NO_OFFSET
    assert lay.unicode_ascii_size == cpython.LAYOUTS[(3, 13)].unicode_ascii_size


def _n(name: str) -> Frame:
    return Frame(0x1000 + len(name), name, "native", Mapping(0, 1 << 40, 0, "/usr/bin/python3"))


def _py(name: str, entry: bool = False) -> tuple[Frame, bool]:
    return Frame(0, name, "cpython", None, "/app/x.py", 7), entry


def test_interleave_puts_each_eval_calls_frames_on_its_eval_frame() -> None:
    eval_ = "_PyEval_EvalFrameDefault"
    native = [_n("leaf_c"), _n(eval_), _n("list_sort"), _n(eval_), _n("main")]
    python = [_py("key", True), _py("do_sort"), _py("<module>", True)]
    frames, aligned = cpython.interleave(native, python)
    assert [f.function for f in frames] == ["leaf_c", "key", eval_, "list_sort", "do_sort", "<module>", eval_, "main"]
    assert aligned
    # A native walk cut short: the outer run goes at the root end, and the mismatch is reported.
    frames, aligned = cpython.interleave(native[:3], python)
    assert [f.function for f in frames] == ["leaf_c", "key", eval_, "list_sort", "do_sort", "<module>"]
    assert not aligned
    assert cpython.interleave(native, []) == (tuple(native), True)


def _profile() -> CpuProfile:
    py = Frame(0, "Box.run", "cpython", None, "/app/box.py", 42)
    frames = (py, _n("_PyEval_EvalFrameDefault"), _n("main"))
    return CpuProfile(1, 2, 99, [StackSample(frames, 3, pid=7, tid=7)])


def test_otlp_python_frames_have_type_file_and_line() -> None:
    from receiver.convert.profiles import profile_to_otlp

    req = profile_to_otlp(_profile())
    d = req.dictionary
    locs = [loc for loc in d.location_table[1:]
            if any(d.string_table[d.attribute_table[i].key_strindex] == "profile.frame.type"
                   and d.attribute_table[i].value.string_value == "cpython" for i in loc.attribute_indices)]
    assert len(locs) == 1 and locs[0].mapping_index == 0
    line = locs[0].lines[0]
    fn = d.function_table[line.function_index]
    assert (d.string_table[fn.name_strindex], d.string_table[fn.filename_strindex], line.line) == \
        ("Box.run", "/app/box.py", 42)


def test_pprof_round_trip_keeps_python_frames() -> None:
    from receiver.profiling.output.pprof import from_pprof, to_pprof

    back = from_pprof(to_pprof(_profile()))
    assert back.samples[0].frames[0] == Frame(0, "Box.run", "cpython", None, "/app/box.py", 42)
    assert back.samples[0].frames[1].frame_type == "native"
