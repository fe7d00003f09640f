"""The compile cache (issue 29): a hit loads, through libbpf and without BCC, the same programs
(equal kernel tags), maps and attach points as a compile; a corrupt entry, a truncated one and
one from another kernel are recompiled, never loaded; concurrent compiles of one program run
once; the agent starts on a hit with no loader process, and compiles with /lib/modules empty and
read-only (the agent's own headers)."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver.config import ProfilerSourceConfig
from receiver.kernel import compile_cache, features
from receiver.kernel.libbpf import PROG_ARRAY, BpfObject, lib, map_info, prog_info
from receiver.kernel.loader import compile_bpf

from .harness import REPO, Agent, Collector, agent_config, compile_c

PROCESS_CFLAGS = ["-DHAS_GROUP_DEAD=1", "-DRINGBUF_PAGES=8", "-DMAX_INFLIGHT_EXECS=64", "-DMAX_TRACKED_EXITS=64"]
EMPTY_LIB_MODULES = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o ro tmpfs /lib/modules && exec "$@"', "sh"]


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "cache"
    before = compile_cache.settings()
    compile_cache.configure(str(d), None)
    compile_cache.stats.clear()
    yield d
    compile_cache.configure(before["directory"], before["kernel_headers"])


def _syscalls_cflags() -> list[str]:
    return ["-DSLOW_THRESHOLD_NS=10000000ULL", "-DSLOW_SPANS=1", "-DFILTER_PROCESS=0", "-DMAX_SERIES=64",
            "-DMAX_THREADS=1024", "-DRINGBUF_PAGES=8", *features.syscalls_cflags()]


def _task_fd_query(fd: int) -> tuple[int, str, int]:
    """(fd type, tracepoint name, program id) of an attachment (BPF_TASK_FD_QUERY, as `bpftool perf`)."""
    buf = ctypes.create_string_buffer(256)
    attr = (ctypes.c_uint8 * 48)()
    ctypes.c_uint32.from_buffer(attr, 0).value = os.getpid()
    ctypes.c_uint32.from_buffer(attr, 4).value = fd
    ctypes.c_uint32.from_buffer(attr, 12).value = len(buf)
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(buf)
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": 321, "aarch64": 280}[platform.machine()]
    assert libc.syscall(nr, 20, ctypes.byref(attr), ctypes.sizeof(attr)) == 0, os.strerror(ctypes.get_errno())
    return (ctypes.c_uint32.from_buffer(attr, 28).value, buf.value.decode(),
            ctypes.c_uint32.from_buffer(attr, 24).value)


def signature(obj: BpfObject) -> dict[str, Any]:
    """What the kernel says was loaded: maps, programs (type and tag, a hash of the
    instructions), program array slots and attach points, by name."""
    infos = {name: prog_info(fd) for name, fd in obj.programs.items()}
    by_id = {i["id"]: name for name, i in infos.items()}
    maps = {name: {k: v for k, v in map_info(t.map_fd).items() if k != "id"} for name, t in obj.tables.items()}
    slots = {}
    for name, t in obj.tables.items():
        if t.map_type == PROG_ARRAY:
            for i in range(t.max_entries):
                k, v = ctypes.c_uint32(i), ctypes.c_uint32()
                if lib().bpf_map_lookup_elem(t.map_fd, ctypes.byref(k), ctypes.byref(v)) == 0:
                    slots[f"{name}[{i}]"] = by_id[v.value]
    attach = []
    for fd in obj._attachments:
        kind, point, prog_id = _task_fd_query(fd)
        attach.append((kind, point, by_id[prog_id]))
    return {"maps": maps, "programs": {n: (i["type"], i["tag"]) for n, i in infos.items()},
            "slots": slots, "attach": attach, "attach_points": obj.attach_points}


def _load_twice(load: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    first = load()
    try:
        assert first.loader_info["cache"] == "miss"
        cold = signature(first)
    finally:
        first.cleanup()
    second = load()
    try:
        assert second.loader_info["cache"] == "hit", second.loader_info
        assert compile_cache.wait_deferred(120)   # the walkers load while the program samples
        warm = signature(second)
    finally:
        second.cleanup()
    return cold, warm


@pytest.mark.bpf
@pytest.mark.parametrize("program", ["process", "syscalls", "profiler"])
def test_a_hit_loads_the_same_programs_maps_and_attach_points(bpf_ok: None, cache: Path, program: str) -> None:
    if program == "process":
        def load() -> BpfObject:
            return compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS)
    elif program == "syscalls":   # raw tracepoints
        def load() -> BpfObject:
            return compile_bpf("syscalls", "syscalls.bpf.c", _syscalls_cflags())
    else:                          # perf-event programs, tail calls in a program array, tracepoints
        from receiver.profiling.sampler import CpuSampler

        sampler = CpuSampler(ProfilerSourceConfig(preset="development"))
        load = sampler.load
    cold, warm = _load_twice(load)
    assert cold["programs"] and cold["maps"] and cold["attach"]
    if program == "profiler":
        assert cold["slots"], "the walkers' program array is empty"
    if program == "syscalls":
        assert {kind for kind, _, _ in cold["attach"]} == {0}   # BPF_FD_TYPE_RAW_TRACEPOINT
    assert warm == cold
    assert compile_cache.stats["hit"] == 1 and compile_cache.stats["miss"] == 1
    assert len(list((cache / "bpf").glob("*.entry"))) == 1


def _entry(cache: Path) -> Path:
    (entry,) = (cache / "bpf").glob("*.entry")
    return entry


@pytest.mark.bpf
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "another kernel", "another format"])
def test_a_damaged_or_foreign_entry_is_recompiled_never_loaded(bpf_ok: None, cache: Path, damage: str) -> None:
    compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS).cleanup()
    path = _entry(cache)
    raw = path.read_bytes()
    if damage == "flipped byte":
        raw = raw[:-100] + bytes([raw[-100] ^ 0x40]) + raw[-99:]
        reason = "corrupt"
    elif damage == "truncated":    # a partial write (which the rename prevents) or a full disk
        raw = raw[:len(raw) // 2]
        reason = "corrupt"
    elif damage == "another kernel":   # e.g. a cache directory carried over to another node
        entry = compile_cache.decode(raw)
        entry["meta"]["kernel"] = "5.10.0-other-amd64"
        raw = compile_cache.encode(entry)
        reason = "mismatch"
    else:
        entry = compile_cache.decode(raw)
        entry["format"] = compile_cache.FORMAT_VERSION + 1
        raw = compile_cache.encode(entry)
        reason = "mismatch"
    path.write_bytes(raw)
    compile_cache.stats.clear()
    obj = compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS)
    try:
        assert obj.loader_info["cache"] == "miss", "a damaged entry was loaded"
        assert compile_cache.stats[reason] == 1 and compile_cache.stats["hit"] == 0
    finally:
        obj.cleanup()
    assert path.read_bytes() != raw   # replaced by the compile
    again = compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS)
    assert again.loader_info["cache"] == "hit"
    again.cleanup()


@pytest.mark.bpf
def test_an_entry_of_another_kernel_release_is_never_found(bpf_ok: None, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = compile_cache._kernel()
    monkeypatch.setattr(compile_cache, "_kernel", lambda: ("5.10.0-other-amd64", *real[1:]))
    compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS).cleanup()
    monkeypatch.setattr(compile_cache, "_kernel", lambda: real)
    obj = compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS)
    try:
        assert obj.loader_info["cache"] == "miss"
    finally:
        obj.cleanup()
    assert len(list((cache / "bpf").glob("*.entry"))) == 2


@pytest.mark.bpf
def test_concurrent_agents_compile_once(bpf_ok: None, cache: Path) -> None:
    results: list[BpfObject] = []

    def load() -> None:
        results.append(compile_bpf("process", "process.bpf.c", PROCESS_CFLAGS))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(o.loader_info["cache"] for o in results) == ["hit", "hit", "miss"]
    finally:
        for o in results:
            o.cleanup()


def test_instructions_keep_no_descriptor() -> None:
    # r1 = map fd 7 (ld_imm64, two slots), r0 = 0, exit
    insns = bytes([0x18, 0x11, 0, 0, 7, 0, 0, 0]) + bytes(8) + bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]) + \
        bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
    out, relocs = compile_cache.unbind_maps(insns, {7: 3})
    assert relocs == [[0, 3]] and out[4:8] == bytes(4) and out[8:] == insns[8:]
    with pytest.raises(ValueError, match="no map"):
        compile_cache.unbind_maps(insns, {8: 0})


@pytest.mark.bpf
@pytest.mark.collector
def test_the_agent_starts_on_a_hit_without_a_loader_and_compiles_without_lib_modules(
        bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """Cold: /lib/modules empty and read-only (no build link), so the headers are the agent's
    own (/usr/src); warm: every source from the cache, no loader process, no compiler mapped."""
    config = agent_config(collector, {"process": {}, "syscalls": {}, "network": {},
                                      "profiler": {"preset": "development"}},
                          bpf={"cache_dir": str(tmp_path / "cache")})
    for run in ("cold", "warm"):
        agent = Agent(tmp_path, config, wrapper=EMPTY_LIB_MODULES)
        agent.start()
        try:
            assert agent.proc is not None
            for name in ("process", "syscalls", "network", "profiler"):
                assert agent.metric_value("ebpf_receiver_source_up", source=name) == 1, agent.log()[-3000:]
            log = agent.log()
            if run == "cold":
                assert log.count("loader peak RSS") == 4, log[-3000:]
            else:
                assert log.count("loader peak RSS") == 0 and log.count("loaded from the compile cache") == 4
                maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
                assert "libbcc" not in maps and "libLLVM" not in maps
        finally:
            assert agent.stop() == 0
        agent.log_path.rename(tmp_path / f"agent-{run}.log")


# Runs for 2 s of its own CPU time (so a loaded machine stretches it as much as the CLI's start).
TWO_SECONDS_C = r"""
#include <time.h>
static volatile unsigned long sink;
__attribute__((noinline)) static void busy(void) { for (int i = 0; i < 100000; i++) sink += i; }
int main(void) {
    struct timespec t;
    do { busy(); clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); } while (t.tv_sec < 2);
    return 0;
}
"""


def _profile(pid: int, tmp_path: Path, env: dict[str, str], duration: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EMPTY_LIB_MODULES, sys.executable, "-m", "receiver", "profile", "--pid", str(pid),
                           "--duration", duration, "--output", str(tmp_path / f"p{pid}.pb.gz")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.bpf
def test_profile_of_a_two_second_program_records_its_samples(bpf_ok: None, tmp_path: Path) -> None:
    """``profile`` with /lib/modules empty and read-only: the first run compiles against the
    agent's own headers and fills the cache; the second, from the cache, samples a program that
    starts with it and ends 2 s (of CPU) later."""
    env = {**os.environ, "EBPF_RECEIVER_CACHE_DIR": str(tmp_path / "cache")}
    prog = compile_c(TWO_SECONDS_C, tmp_path / "two", "-O1")
    warmup = subprocess.Popen([str(prog)])
    first = _profile(warmup.pid, tmp_path, env, "1s")
    warmup.wait()
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "bpf").glob("*.entry"))) == 1
    target = subprocess.Popen([str(prog)])
    second = _profile(target.pid, tmp_path, env, "4s")
    target.wait()
    assert second.returncode == 0, second.stderr[-3000:]
    m = re.search(r"(\d+) samples in (\d+) stacks", second.stderr)
    assert m and int(m[1]) > 0, second.stderr[-3000:]


def test_the_cache_keeps_the_most_recently_used_entries(cache: Path) -> None:
    meta = {"format": str(compile_cache.FORMAT_VERSION), "kernel": "k"}
    content = {"maps": [], "programs": [], "license": "GPL", "prog_arrays": [], "attach": []}
    keys = [f"{i:064x}" for i in range(compile_cache.MAX_ENTRIES + 1)]
    for i, key in enumerate(keys):
        path = compile_cache.store(key, meta, content)
        assert path is not None
        os.utime(path, (i, i))
    assert compile_cache.lookup(keys[1], meta) is not None   # used: now the most recent
    compile_cache.store(f"{999:064x}", meta, content)
    left = {p.stem for p in (cache / "bpf").glob("*.entry")}
    assert len(left) == compile_cache.MAX_ENTRIES
    assert keys[1] in left and keys[0] not in left and keys[2] not in left


def _split_tree(root: Path) -> tuple[Path, Path]:
    """A Debian-style split header tree: ``*-amd64`` (generated headers, a Makefile naming its
    common half) and ``*-common`` (the rest)."""
    common, arch = root / "linux-headers-9.9.0-1-common", root / "linux-headers-9.9.0-1-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "Makefile").write_text(f"include {common}/Makefile\n")
    return arch, common


def test_the_agents_own_headers_split_or_whole(tmp_path: Path) -> None:
    from receiver.kernel.bcc import find_kernel_headers

    arch, common = _split_tree(tmp_path)
    split = find_kernel_headers(str(arch))
    assert split is not None and split.root == str(common.resolve()) and split.origin == "bpf.kernel_headers"
    assert f"-I{arch.resolve()}/include" in split.cflags
    (common / "include/generated").mkdir()
    whole = find_kernel_headers(str(common))
    assert whole is not None and whole.root == str(common.resolve()) and whole.cflags == ()
    assert find_kernel_headers(str(tmp_path / "nothing")) is None


def test_check_names_the_headers_and_the_cache(tmp_path: Path) -> None:
    from receiver.config import EbpfConfig
    from receiver.preflight import _bpf_rows

    arch, common = _split_tree(tmp_path)
    config = EbpfConfig.from_dict({"bpf": {"cache_dir": str(tmp_path / "cache"), "kernel_headers": str(arch)}},
                                  environ={})
    headers, cache_row = _bpf_rows(config, ("process",))
    assert headers.ok and str(common.resolve()) in headers.detail and "bpf.kernel_headers" in headers.detail
    assert cache_row.ok and f"{tmp_path / 'cache'}: 0 entries" in cache_row.detail


@pytest.mark.bpf
def test_a_hit_opens_the_pinned_maps_instead_of_creating_them(bpf_ok: None, cache: Path) -> None:
    """Request links (receiver/profiling/links.py): the profiler opens req_links, OBI's
    traces_ctx_v1 and link_traces by their bpffs pins. A hit opens the same pins (the same
    kernel maps, not new ones) and loads the same programs; a pin path of another agent process
    (another directory here) finds the same entry and opens that process's pins."""
    import shutil
    import uuid

    from receiver.profiling import links
    from receiver.profiling.sampler import CpuSampler

    pinned = ("req_links", "traces_ctx_v1", "link_traces")
    root = Path("/sys/fs/bpf") / f"ebpf_otlp_test_{uuid.uuid4().hex[:12]}"
    config = ProfilerSourceConfig(preset="development", unwind_tables=False, request_links=True,
                                  traces_ctx_read=True)

    def load(pin_dir: Path) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
        links.unpin()
        pin_dir.mkdir(parents=True, exist_ok=True)
        links.configure(str(pin_dir))
        obj = CpuSampler(config).load()
        try:
            ids = {n: map_info(obj[n].map_fd)["id"] for n in pinned}
            pins = {}
            for name, path in links.pins().items():
                fd = lib().bpf_obj_get(path.encode())
                assert fd >= 0, path
                pins[name] = map_info(fd)["id"]
                os.close(fd)
            assert set(pins) == set(pinned)
            return {**signature(obj), "cache": obj.loader_info["cache"]}, ids, pins
        finally:
            obj.cleanup()

    try:
        cold, cold_ids, cold_pins = load(root / "a")
        warm, warm_ids, warm_pins = load(root / "a")
        other, other_ids, other_pins = load(root / "b")
    finally:
        links.unpin()
        links.configure(links.DEFAULT_PIN_DIR)
        shutil.rmtree(root, ignore_errors=True)
    assert (cold.pop("cache"), warm.pop("cache"), other.pop("cache")) == ("miss", "hit", "hit")
    assert cold_ids == cold_pins and warm_ids == warm_pins and other_ids == other_pins
    # traces_ctx_v1 stays pinned (OBI's): the same map again; our own pins are new per process
    assert warm_ids["traces_ctx_v1"] == cold_ids["traces_ctx_v1"]
    assert other_ids["req_links"] != warm_ids["req_links"]
    assert warm == cold and other == cold
    assert compile_cache.stats["hit"] == 2 and compile_cache.stats["miss"] == 1
