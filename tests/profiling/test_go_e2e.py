"""Go programs built as release pipelines build them (``-ldflags="-s -w"``: no symbol table, no
DWARF), profiled with real BPF: stacks walked with unwind rows made from ``.gopclntab``'s frame
sizes (Go has no ``.eh_frame``), named from ``.gopclntab`` with inlined calls as frames.

Three Go toolchains: the host's ``go`` and two older ones from the Go module proxy (the
``golang.org/toolchain`` modules ``GOTOOLCHAIN=auto`` fetches), cached in
``~/.cache/ebpf-otlp-receiver/go-toolchains``."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, go_env, wait_until
from .test_unwind_e2e import hot_samples, profiled, user_frames

pytestmark = [pytest.mark.bpf]

# The host's go, plus the oldest supported release line and one between.
OLDER_TOOLCHAINS = ("1.21.13", "1.23.12")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ebpf-otlp-receiver"

CHAIN_SOURCE = """\
package main

import (
	"os"
	"strconv"
	"time"
)

var sink uint64

// Two frameless leaves of the same cost: the split between them is the calls' 3:1.
//
//go:noinline
func goHotA(n int) uint64 {
	var s uint64
	for i := 0; i < n; i++ {
		s += uint64(i) ^ (s >> 3)
	}
	return s
}

//go:noinline
func goHotB(n int) uint64 {
	var s uint64
	for i := 0; i < n; i++ {
		s += uint64(i) ^ (s >> 3)
	}
	return s
}

//go:noinline
func stage2(k int) {
	if k%4 == 3 {
		sink += goHotB(20000)
	} else {
		sink += goHotA(20000)
	}
}

func stage1(k int) { stage2(k) } // CALL stage2: inlined into dispatch

func dispatch(k int) { stage1(k) } // CALL stage1: inlined into runLoop

//go:noinline
func runLoop(end time.Time) {
	for k := 0; time.Now().Before(end); k++ {
		dispatch(k) // CALL dispatch
	}
}

func main() {
	secs, _ := strconv.Atoi(os.Args[1])
	runLoop(time.Now().Add(time.Duration(secs) * time.Second))
}
"""

CGO_SOURCE = """\
package main

/*
void cHot(int n);
void cCallsBack(int n);
*/
import "C"

import (
	"os"
	"strconv"
	"time"
)

var sink uint64

//go:noinline
func goSpin(n int) uint64 {
	var s uint64
	for i := 0; i < n; i++ {
		s += uint64(i) ^ (s >> 3)
	}
	return s
}

//export goCallback
func goCallback(n C.int) {
	sink += goSpin(int(n))
}

//go:noinline
func callC(k int) {
	if k%2 == 0 {
		C.cHot(20000)
	} else {
		C.cCallsBack(20000)
	}
}

func main() {
	secs, _ := strconv.Atoi(os.Args[1])
	end := time.Now().Add(time.Duration(secs) * time.Second)
	for k := 0; time.Now().Before(end); k++ {
		callC(k)
	}
}
"""

CGO_C_SOURCE = """\
#include "_cgo_export.h"
static volatile unsigned long csink;
__attribute__((noinline)) static void c_spin(int n) {
    for (int i = 0; i < n; i++) csink += (unsigned long)i ^ (csink >> 3);
}
__attribute__((noinline)) void cHot(int n) { c_spin(n); csink++; }
__attribute__((noinline)) void cCallsBack(int n) { goCallback(n); csink++; }
"""

CHAIN = ["main.stage2", "main.stage1", "main.dispatch", "main.runLoop", "main.main"]


def _lines(source: str) -> dict[str, int]:
    out = {}
    for i, text in enumerate(source.splitlines(), 1):
        if "// CALL " in text:
            out[text.split("// CALL ")[1].split(":")[0].strip()] = i
    return out


def _toolchain(version: str) -> Path:
    """``go`` of Go ``version`` from the Go module proxy, cached."""
    root = CACHE / "go-toolchains" / f"go{version}"
    if (root / "bin" / "go").exists():
        return root / "bin" / "go"
    proxy = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0]
    url = f"{proxy}/golang.org/toolchain/@v/v0.0.1-go{version}.linux-amd64.zip"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        archive = Path(tmp) / "go.zip"
        with urllib.request.urlopen(url, timeout=300) as r, open(archive, "wb") as f:  # noqa: S310 (the proxy)
            shutil.copyfileobj(r, f)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        extracted = next(Path(tmp, "golang.org").glob("toolchain@*"))
        for tool in extracted.rglob("*"):     # zip files keep no modes
            if tool.is_file() and (tool.parent.name == "bin" or "/pkg/tool/" in str(tool)):
                tool.chmod(0o755)
        if not (root / "bin" / "go").exists():
            extracted.rename(root)
    return root / "bin" / "go"


def _go(version: str) -> Path:
    if version == "host":
        found = shutil.which("go")
        assert found, "go is not installed (make test installs it)"
        return Path(found)
    return _toolchain(version)


def go_build(version: str, out: Path, source: str, *flags: str, c_source: str = "") -> Path:
    """A Go program from ``source`` built with Go ``version`` ("host": the host's go)."""
    d = out.with_name(out.name + "-src")
    d.mkdir(parents=True, exist_ok=True)
    (d / "go.mod").write_text("module gotest\n\ngo 1.21\n")
    (d / "main.go").write_text(source)
    if c_source:
        (d / "cside.c").write_text(c_source)
    env = {**go_env(d), "CGO_ENABLED": "1" if c_source else "0"}
    subprocess.run([str(_go(version)), "build", *flags, "-o", str(out), "."], cwd=d, env=env,
                   check=True, timeout=600, capture_output=True)
    return out


def _sections(path: Path) -> str:
    return subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True, check=True).stdout


def go_version(path: Path) -> str:
    return subprocess.run([str(_go("host")), "version", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def _profile(program: Path, seconds: float = 8.0) -> tuple[Any, dict[str, int]]:
    from receiver.kernel.compile_cache import wait_deferred

    with profiled(str(program), "3600") as (_, prof):
        prof.warm()
        # A program from the compile cache gets its walkers verified on a thread while it samples
        # (a tail call into an empty slot falls through to the frame-pointer stack, which skips a
        # frameless leaf's caller): those samples are not what is measured here.
        assert wait_deferred(300), "the profiler's walkers did not load"
        prof.sampler.drain()
        profile = prof.measure(seconds)
        return profile, prof.kernel_stats()


def _check_chain(profile: Any, lines: dict[str, int]) -> None:
    hot = hot_samples(profile, "main.goHotA") + hot_samples(profile, "main.goHotB")
    total = sum(n for _, n in hot)
    assert total >= 100, collections.Counter(tuple(f.function for f in user_frames(s)) for s in profile.samples)
    whole = sum(n for names, n in hot if names[1:1 + len(CHAIN)] == CHAIN)
    assert whole / total >= 0.95, collections.Counter(tuple(names) for names, _ in hot).most_common(4)
    share_a = sum(n for names, n in hot if names[0] == "main.goHotA") / total
    assert 0.75 * 0.9 <= share_a <= 0.75 * 1.1, share_a          # 3:1 within 10 %
    # Every frame of the chain is a Go frame from main.go; the inlined ones carry their call lines.
    sample = next(s for s in profile.samples if [f.function for f in user_frames(s)][1:1 + len(CHAIN)] == CHAIN)
    frames = user_frames(sample)
    assert {f.frame_type for f in frames[:6]} == {"go"}, frames[:6]
    assert all(f.file.endswith("main.go") for f in frames[:6]), frames[:6]
    by_name = {f.function: f for f in frames}
    assert by_name["main.stage1"].line == lines["stage2"]
    assert by_name["main.dispatch"].line == lines["stage1"]
    assert by_name["main.runLoop"].line == lines["dispatch"]
    # The inlined frames stand at the address of the real call's return
    assert by_name["main.stage1"].address == by_name["main.dispatch"].address == by_name["main.runLoop"].address
    # go build ids on the mapping
    assert frames[0].mapping is not None and frames[0].mapping.go_build_id.count("/") == 3, frames[0].mapping


@pytest.mark.parametrize("version", ["host", *OLDER_TOOLCHAINS])
def test_stripped_go_chain_with_inlined_frames(bpf_ok: None, tmp_path: Path, version: str) -> None:
    program = go_build(version, tmp_path / "chain", CHAIN_SOURCE, "-ldflags=-s -w")
    sections = _sections(program)
    assert ".symtab" not in sections and ".debug_info" not in sections and ".eh_frame" not in sections
    if version != "host":
        assert go_version(program) == f"go{version}"
    profile, stats = _profile(program)
    _check_chain(profile, _lines(CHAIN_SOURCE))
    assert stats["walked"] > 0


def test_stripped_go_pie_chain(bpf_ok: None, tmp_path: Path) -> None:
    program = go_build("host", tmp_path / "chain_pie", CHAIN_SOURCE, "-buildmode=pie", "-ldflags=-s -w")
    assert "DYN" in subprocess.run(["readelf", "-h", str(program)], capture_output=True, text=True).stdout
    profile, _ = _profile(program)
    _check_chain(profile, _lines(CHAIN_SOURCE))


def test_cgo_call_into_c_and_callback_into_go(bpf_ok: None, tmp_path: Path) -> None:
    """C called through cgo (on the system stack) continues into the Go code that called it;
    Go called back from C continues through runtime.cgocallback into the Go code that called C."""
    program = go_build("host", tmp_path / "cgo", CGO_SOURCE, "-ldflags=-w", c_source=CGO_C_SOURCE)
    profile, _ = _profile(program)
    into_c = hot_samples(profile, "c_spin")
    back = hot_samples(profile, "main.goSpin")
    assert sum(n for _, n in into_c) >= 50 and sum(n for _, n in back) >= 50, profile.samples[:5]

    def share(samples: list[tuple[list[str], int]], ok: Any) -> float:
        return sum(n for names, n in samples if ok(names)) / sum(n for _, n in samples)

    def ends_in_go(names: list[str], called_from: str) -> bool:
        # ... ← main._Cfunc_<f> ← main.callC ← main.main ← runtime.main ← runtime.goexit
        i = names.index(called_from) if called_from in names else -1
        return i > 0 and names[i:i + 5] == [called_from, "main.callC", "main.main", "runtime.main", "runtime.goexit"]

    assert share(into_c, lambda n: n[:2] == ["c_spin", "cHot"] and ends_in_go(n, "main._Cfunc_cHot")) >= 0.95, \
        collections.Counter(tuple(n) for n, _ in into_c).most_common(3)
    assert share(back, lambda n: n[:2] == ["main.goSpin", "main.goCallback"] and "runtime.cgocallback" in n
                 and ends_in_go(n, "main._Cfunc_cCallsBack")) >= 0.95, \
        collections.Counter(tuple(n) for n, _ in back).most_common(3)


def test_collector_receives_go_frames_and_build_id(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    program = go_build("host", tmp_path / "chain", CHAIN_SOURCE, "-ldflags=-s -w")
    go_build_id = subprocess.run([str(_go("host")), "tool", "buildid", str(program)], capture_output=True,
                                 text=True, check=True, env=go_env(tmp_path)).stdout.strip()
    proc = subprocess.Popen([str(program), "3600"], stdout=subprocess.DEVNULL)
    try:
        cfg = {"preset": "development", "report_interval": "2s", "filter": {"pids": [proc.pid]}}
        agent = Agent(tmp_path, agent_config(collector, {"profiler": cfg})).start()
        try:
            def go_frames() -> tuple[set[tuple[str, str, int]], set[str]] | None:
                frames, build_ids = _otlp_go_frames(collector)
                names = {f for f, _, _ in frames}
                return (frames, build_ids) if {"main.goHotA", "main.stage1", "main.dispatch"} <= names else None

            frames, build_ids = wait_until(go_frames, 90, 0.5, "go frames in profiles.jsonl")
        finally:
            assert agent.stop() == 0
    finally:
        proc.kill()
        proc.wait()
    lines = _lines(CHAIN_SOURCE)
    assert any(f == "main.stage1" and file.endswith("main.go") and line == lines["stage2"] for f, file, line in frames)
    assert go_build_id in build_ids, (go_build_id, build_ids)


def _otlp_go_frames(collector: Collector) -> tuple[set[tuple[str, str, int]], set[str]]:
    """(function, file, line) of every location with profile.frame.type go, and every
    process.executable.build_id.go of a mapping, decoded through each request's dictionary."""
    frames: set[tuple[str, str, int]] = set()
    build_ids: set[str] = set()
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings, funcs = d.get("stringTable", []), d.get("functionTable", [])
        attrs = d.get("attributeTable", [])

        def kv(i: int, attrs: list[Any] = attrs, strings: list[str] = strings) -> tuple[str, Any]:
            a = attrs[i]
            key = a["key"] if "key" in a else strings[a.get("keyStrindex", 0)]
            value = a.get("value", {})
            value = strings[value["stringValueStrindex"]] if "stringValueStrindex" in value \
                else value.get("stringValue")
            return key, value

        for m in d.get("mappingTable", []):
            for i in m.get("attributeIndices", []):
                key, value = kv(i)
                if key == "process.executable.build_id.go":
                    build_ids.add(value)
        for loc in d.get("locationTable", []):
            if {kv(i) for i in loc.get("attributeIndices", [])} != {("profile.frame.type", "go")}:
                continue
            for line in loc.get("lines", []):
                f = funcs[line.get("functionIndex", 0)]
                frames.add((strings[f.get("nameStrindex", 0)], strings[f.get("filenameStrindex", 0)],
                            int(line.get("line", 0))))
    return frames, build_ids
