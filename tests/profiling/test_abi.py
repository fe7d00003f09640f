"""``receiver/profiling/abi.py`` (and each runtime's mirror) against the headers as a C compiler
reads them: every mirrored struct's size and every field's offset and size, and every constant
user space takes from a header, printed by a program gcc builds from the headers themselves. No
BPF: a changed field or constant fails here before any program loads."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from receiver.kernel.bcc import bpf_source_dir, header_defines
from receiver.profiling import abi
from receiver.profiling.runtimes import RUNTIMES

from ..harness import compile_c

# ctypes mirror → the C struct it mirrors
PROFILER_STRUCTS = {
    abi.ProfKey: "prof_key", abi.RuntimeUnwindStack: "unwind_stack", abi.NewProcess: "prof_new_process",
    abi.WholeSample: "prof_sample", abi.RuntimeFrameNotice: "prof_runtime_frame",
    abi.RuntimeProcess: "runtime_process", abi.UnwindRow: "unwind_row", abi.UnwindMapping: "unwind_mapping",
    abi.UnwindProcess: "unwind_process",
}
_STRUCT = re.compile(r"^struct (\w+) \{\n.*?^\};", re.M | re.S)


def _layout_program(structs: dict[type, str], defines: list[str], extra: str = "") -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>",
             '#include "profiler.h"', extra, "int main(void) {"]
    for mirror, name in structs.items():
        lines.append(f'    printf("%s size %zu\\n", "{name}", sizeof(struct {name}));')
        for field, *_ in mirror._fields_:
            lines.append(f'    printf("%s.%s %zu %zu\\n", "{name}", "{field}", offsetof(struct {name}, {field}), '
                         f"sizeof(((struct {name} *)0)->{field}));")
    for d in defines:
        lines.append(f'    printf("#%s %llu\\n", "{d}", (unsigned long long)({d}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines)


def _run(tmp_path: Path, source: str, *flags: str) -> dict[str, str]:
    exe = compile_c(source, tmp_path / "layout", f"-I{bpf_source_dir()}", *flags)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def _compare(c: dict[str, str], structs: dict[type, str]) -> list[str]:
    problems = []
    for mirror, name in structs.items():
        if c[name] != f"size {ctypes.sizeof(mirror)}":
            problems.append(f"struct {name}: C {c[name]}, ctypes {ctypes.sizeof(mirror)}")
        for field, *_ in mirror._fields_:
            d = getattr(mirror, field)
            if c[f"{name}.{field}"] != f"{d.offset} {d.size}":
                problems.append(f"{name}.{field}: C (offset size) {c[f'{name}.{field}']}, ctypes {d.offset} {d.size}")
    return problems


def test_profiler_structs_match_the_header_as_gcc_lays_it_out(tmp_path: Path) -> None:
    defines = sorted(header_defines(abi.HEADER))
    c = _run(tmp_path, _layout_program(PROFILER_STRUCTS, defines), f"-DRUNTIME_MAX_FRAMES={abi.RUNTIME_MAX_FRAMES}")
    assert _compare(c, PROFILER_STRUCTS) == []
    # Every constant read from the header is the value the compiler sees (a define whose value
    # is an expression is not one the reader takes: it would be missing, and abi's import fail).
    # RUNTIME_MAX_FRAMES is the one set with -D; the header's own default is 0 (runtimes off).
    assert int(c["#RUNTIME_MAX_FRAMES"]) == abi.RUNTIME_MAX_FRAMES
    assert header_defines(abi.HEADER).pop("RUNTIME_MAX_FRAMES") == 0
    seen = {d: int(c[f"#{d}"]) for d in defines if d != "RUNTIME_MAX_FRAMES"}
    assert seen == {d: v for d, v in header_defines(abi.HEADER).items() if d != "RUNTIME_MAX_FRAMES"}


def test_walked_stack_without_runtimes_matches(tmp_path: Path) -> None:
    structs = {abi.UnwindStack: "unwind_stack"}
    assert _compare(_run(tmp_path, _layout_program(structs, [])), structs) == []


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_runtime_structs_match_their_walker_header(runtime: type, tmp_path: Path) -> None:
    """Each runtime's mirrored structs (its per-process data) against the struct definitions of
    its bpf/runtimes/<name>.bpf.h (taken out of the BPF code around them), and its data fits."""
    text = (bpf_source_dir() / runtime.bpf_header).read_text()
    defined = {m.group(1): m.group(0) for m in _STRUCT.finditer(text)}
    structs = {}
    for _, _, mirror in runtime.mirrors:
        name = next(n for n in defined if n.replace("_", "") == mirror.__name__.lower())
        structs[mirror] = name
    assert structs, f"{runtime.name} mirrors no struct of {runtime.bpf_header}"
    program = _layout_program(structs, [], "\n".join(defined[n] for n in structs.values()))
    assert _compare(_run(tmp_path, program, f"-DRUNTIME_MAX_FRAMES={abi.RUNTIME_MAX_FRAMES}"), structs) == []
    for mirror in structs:
        assert ctypes.sizeof(mirror) <= abi.RUNTIME_DATA_BYTES


def test_record_kinds_and_slots_are_distinct() -> None:
    assert len({abi.REC_NEW_PROCESS, abi.REC_SAMPLE, abi.REC_RUNTIME_FRAME}) == 3
    assert "stack_collision" in abi.LOST_REASONS and "counted" in abi.STAT_NAMES
    assert abi.UNWIND_NATIVE_SLOT == 0 and len(RUNTIMES) < abi.RUNTIME_SLOTS
