"""BCC's compiler stays out of the agent (issue 16): programs are compiled and loaded in a loader
process, the agent holds their descriptors and uses them through libbpf."""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.errors import SourceUnavailableError
from receiver.kernel import compile_cache, loader
from receiver.kernel.loader import compile_bpf

from .harness import Agent, Collector, agent_config

PROCESS_CFLAGS = ["-DHAS_GROUP_DEAD=1", "-DRINGBUF_PAGES=8", "-DMAX_INFLIGHT_EXECS=64", "-DMAX_TRACKED_EXITS=64"]
COMPILER = re.compile(r"libbcc|libLLVM|libclang")


@pytest.fixture(autouse=True)
def no_compile_cache() -> Iterator[None]:
    """These tests are about the loader process: no cache entry may stand in for it."""
    before = compile_cache.settings()
    compile_cache.configure(None, before["kernel_headers"])
    yield
    compile_cache.configure(before["directory"], before["kernel_headers"])


def _prog_ids(pid: int | str = "self") -> set[int]:
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            m = re.search(r"^prog_id:\s*(\d+)", info.read_text(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m[1]))
    return ids


def _loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out)}


@pytest.mark.bpf
def test_agent_with_all_four_sources_has_no_compiler_mapped(bpf_ok: None, collector: Collector,
                                                            tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {}, "syscalls": {}, "network": {},
                                                     "profiler": {"preset": "development"}},
                                         bpf={"cache_dir": None}))   # every program compiled
    agent.start()
    try:
        assert agent.proc is not None
        for name in ("process", "syscalls", "network", "profiler"):
            assert agent.metric_value("ebpf_receiver_source_up", source=name) == 1, agent.log()[-3000:]
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert not COMPILER.search(maps), [ln for ln in maps.splitlines() if COMPILER.search(ln)][:3]
        assert "libbpf.so.1" in maps
        assert len(_prog_ids(agent.proc.pid)) >= 4   # the agent itself holds the programs
        assert agent.log().count("loader peak RSS") == 4
    finally:
        assert agent.stop() == 0


@pytest.mark.bpf
def test_closing_the_descriptors_detaches_and_unloads(bpf_ok: None) -> None:
    obj = compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS)
    try:
        ours = _prog_ids()
        assert len(ours) == len(obj.programs) >= 5
        assert ours <= _loaded_prog_ids()
        assert obj["lost"].max_entries == 3 and type(obj["lost"]).__name__ == "PerCpuArray"
        assert len(obj["lost"][ctypes.c_int(0)]) >= 1   # one value per possible CPU
    finally:
        obj.cleanup()
    assert not _prog_ids()
    assert not ours & _loaded_prog_ids(), "programs still loaded after the agent closed its descriptors"
    obj.cleanup()   # twice is fine


@pytest.mark.bpf
def test_a_compile_error_is_a_clear_source_unavailable_error(bpf_ok: None) -> None:
    with pytest.raises(SourceUnavailableError) as e:
        compile_bpf("process", "process.bpf.c", [*PROCESS_CFLAGS, "-include", "/nonexistent/broken.h"])
    assert e.value.source == "process"
    assert "process.bpf.c failed to compile or load" in e.value.reason


def test_a_missing_program_file_is_named(bpf_ok: None) -> None:
    with pytest.raises(SourceUnavailableError) as e:
        compile_bpf("process", "no-such.bpf.c")
    assert "no-such.bpf.c is missing" in e.value.reason


def test_a_loader_that_dies_is_a_clear_source_unavailable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_BOOT", "import os; os._exit(3)")
    with pytest.raises(SourceUnavailableError) as e:
        compile_bpf("syscalls", "syscalls.bpf.c")
    assert e.value.source == "syscalls"
    assert "loader process failed (exit status 3)" in e.value.reason and "syscalls.bpf.c" in e.value.reason
