"""User stacks of code built as distributions build it (``-O2``, no frame pointers), walked in
the kernel with unwind tables from ``.eh_frame``: real BPF, real binaries, and ``perf record
--call-graph dwarf`` on the same process as the yardstick.

Each test starts its workload, lets the profiler load the process's tables (the first samples
of a process are walked with frame pointers until then), drops what was counted so far, and
then measures."""

from __future__ import annotations

import bisect
import collections
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..harness import compile_c, go_env, wait_until

pytestmark = [pytest.mark.bpf]

FREQUENCY = 99
# Workloads run until killed: in an emulated guest (the kernel matrix) compiling the program
# alone can take minutes, and a workload that ended meanwhile would leave nothing to sample.
RUN_S = "3600"
CHAIN = ["hot", "f8", "f7", "f6", "f5", "f4", "f3", "f2", "f1", "main"]

CHAIN_SOURCE = r"""
#include <alloca.h>
#include <stdlib.h>
#include <time.h>
static volatile unsigned long sink;
#define NI __attribute__((noinline, noclone))
NI void hot(unsigned n) { for (unsigned i = 0; i < n; i++) sink += i * 7; }   /* a leaf: no frame */
NI void f8(unsigned n) { hot(n); sink++; }
NI void f7(unsigned n) { f8(n); sink++; }
NI void f6(unsigned n) { f7(n); sink++; }
NI void f5(unsigned n) { f6(n); sink++; }
NI void f4(unsigned n) { f5(n); sink++; }
NI void f3(unsigned n) { f4(n); sink++; }
NI void f2(unsigned n) { f3(n); sink++; }
NI void f1(unsigned n) { f2(n); sink++; }
/* Frames of 600 bytes under a shift that moves them across page boundaries call after call:
 * the walk reads the stack in windows that end at a page's end, and these frames' return
 * addresses fall in every place relative to them (in a window, past its page's end, in the next
 * window). */
NI void g4(unsigned n) { volatile char pad[600]; pad[n % 600] = 1; hot(n); sink += pad[7]; }
NI void g3(unsigned n) { volatile char pad[600]; pad[n % 600] = 1; g4(n); sink += pad[7]; }
NI void g2(unsigned n) { volatile char pad[600]; pad[n % 600] = 1; g3(n); sink += pad[7]; }
NI void g1(unsigned n) { volatile char pad[600]; pad[n % 600] = 1; g2(n); sink += pad[7]; }
NI void shifted(unsigned n, unsigned shift) {
    volatile char *p = alloca(shift);
    p[0] = 1;
    g1(n);
    sink += p[0];
}
void nocfi_mid(unsigned n);
NI void clocky(void) {
    struct timespec t;
    for (int i = 0; i < 100000; i++) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        sink += t.tv_nsec;
    }
}
int main(int argc, char **argv) {
    time_t end = time(NULL) + atoi(argv[1]);
    while (time(NULL) < end) {
        if (argc > 2 && argv[2][0] == 'n')
            nocfi_mid(100000);
        else if (argc > 2 && argv[2][0] == 'b')
            for (unsigned k = 0; k < 64; k++)
                shifted(20000, 16 + k * 64);
        else if (argc > 2)
            clocky();
        else
            f1(100000);
    }
    return 0;
}
"""

# Built without call-frame information: a walk that reaches it must stop there.
NOCFI_SOURCE = r"""
void hot(unsigned n);
extern volatile unsigned long nocfi_sink;
volatile unsigned long nocfi_sink;
__attribute__((noinline)) void nocfi_mid(unsigned n) { hot(n); nocfi_sink++; }
"""

CXX_SOURCE = r"""
#include <cstdlib>
#include <ctime>
static volatile unsigned long sink;
namespace shapes {
struct Worker {
    virtual ~Worker() = default;
    virtual unsigned long spin(unsigned n) const;
};
__attribute__((noinline)) unsigned long Worker::spin(unsigned n) const {
    unsigned long s = 0;
    for (unsigned i = 0; i < n; i++) { s += i * i; sink = s; }
    return s;
}
template <int N> struct Level {
    __attribute__((noinline)) static unsigned long go(const Worker &w, unsigned n) {
        unsigned long r = Level<N - 1>::go(w, n);
        sink += r;
        return r + 1;
    }
};
template <> struct Level<0> {
    __attribute__((noinline)) static unsigned long go(const Worker &w, unsigned n) {
        unsigned long r = w.spin(n);
        sink += r;
        return r + 1;
    }
};
}  // namespace shapes
int main(int argc, char **argv) {
    shapes::Worker *w = new shapes::Worker();
    std::time_t end = std::time(nullptr) + std::atoi(argv[1]);
    while (std::time(nullptr) < end)
        shapes::Level<6>::go(*w, 100000);
    delete w;
    return 0;
}
"""

LIB_SOURCE = r"""
static volatile unsigned long sink;
#define NI __attribute__((noinline, noclone))
NI static void lib_hot(unsigned n) { for (unsigned i = 0; i < n; i++) sink += i ^ 5; }
NI static void lib_c(unsigned n) { lib_hot(n); sink++; }
NI static void lib_b(unsigned n) { lib_c(n); sink++; }
NI void lib_a(unsigned n) { lib_b(n); sink++; }
"""

LIB_MAIN_SOURCE = r"""
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
void lib_a(unsigned n);
static volatile sig_atomic_t go;
static void on_usr1(int sig) { (void)sig; go = 1; }
int main(int argc, char **argv) {
    signal(SIGUSR1, on_usr1);
    time_t end = time(NULL) + atoi(argv[1]);
    while (time(NULL) < end && !go)
        lib_a(100000);
    if (argc > 3)                   /* on SIGUSR1: become another program, same pid */
        execv(argv[2], argv + 2);
    return 0;
}
"""

DISTRO_FLAGS = ("-O2", "-fomit-frame-pointer", "-fasynchronous-unwind-tables")


def _build(d: Path, name: str) -> Path:
    if name in ("chain", "chain_stripped"):
        nocfi = d / "nocfi.o"
        (d / "nocfi.c").write_text(NOCFI_SOURCE)
        subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables",
                        "-fno-unwind-tables", "-c", "-o", str(nocfi), str(d / "nocfi.c")], check=True)
        chain = compile_c(CHAIN_SOURCE, d / "chain_o2", *DISTRO_FLAGS, str(nocfi))
        if name == "chain":
            return chain
        stripped = d / "chain_o2_stripped"
        shutil.copy(chain, stripped)
        subprocess.run(["strip", "--strip-debug", str(stripped)], check=True)
        return stripped
    if name == "cxx":
        return compile_c(CXX_SOURCE, d / "shapes_o2", *DISTRO_FLAGS, cxx=True)
    lib = d / "libdeep.so"
    (d / "libdeep.c").write_text(LIB_SOURCE)
    subprocess.run(["gcc", *DISTRO_FLAGS, "-fPIC", "-shared", "-o", str(lib), str(d / "libdeep.c")], check=True)
    (d / "lib_main.c").write_text(LIB_MAIN_SOURCE)
    subprocess.run(["gcc", *DISTRO_FLAGS, "-o", str(d / "lib_main"), str(d / "lib_main.c"), f"-L{d}",
                    "-ldeep", f"-Wl,-rpath,{d}"], check=True)
    return d / "lib_main"


class _Built(dict):
    """Test programs, each built when a test first asks for it (the kernel matrix's guest runs one
    test and has no C++ compiler)."""

    def __init__(self, d: Path) -> None:
        super().__init__()
        self.d = d

    def __missing__(self, name: str) -> Path:
        self[name] = path = _build(self.d, name)
        return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> _Built:
    return _Built(tmp_path_factory.mktemp("unwind"))


class Profiled:
    """A CpuSampler filtered to one process, with its ring buffer read in a thread."""

    def __init__(self, pid: int, **config: Any) -> None:
        from receiver.config import ProcessFilter, ProfilerSourceConfig
        from receiver.profiling.sampler import CpuSampler

        self.pid = pid
        config.setdefault("filter", ProcessFilter(pids=[pid]))   # or the caller's (by name)
        self.sampler = CpuSampler(ProfilerSourceConfig(
            preset="development", frequency=FREQUENCY, report_interval=2.0, **config))
        bpf = self.sampler.load()
        self.sampler.bind(bpf)
        bpf["events"].open_ring_buffer(lambda _c, data, _s: self.sampler.on_record(data))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sampler.bpf.ring_buffer_poll(50)

    def warm(self) -> None:
        """Until the process's tables are in the kernel; then forget what was counted so far."""
        unwinder = self.sampler.unwinder
        assert unwinder is not None, "unwind tables are off on this kernel"
        wait_until(lambda: unwinder.stats["processes_loaded"] >= 1 and unwinder.wait_idle(5), 60,
                   0.2, "the process's unwind tables")
        self.sampler.drain()
        self._kernel_base = self.sampler.unwind_stats()
        self._truncated_base = self.sampler.truncated_samples

    def kernel_stats(self) -> dict[str, int]:
        """The kernel walker's counters since ``warm``."""
        now = self.sampler.unwind_stats()
        return {k: v - self._kernel_base.get(k, 0) for k, v in now.items()}

    def truncated(self) -> int:
        """Drained samples with truncated user stacks since ``warm``."""
        return self.sampler.truncated_samples - self._truncated_base

    def measure(self, seconds: float) -> Any:
        time.sleep(seconds)
        return self.sampler.drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sampler.close()


@contextmanager
def profiled(*argv: str, **config: Any) -> Iterator[tuple[subprocess.Popen[bytes], Profiled]]:
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL)
    prof = None
    try:
        prof = Profiled(proc.pid, **config)
        yield proc, prof
    finally:
        if prof is not None:
            prof.close()
        proc.kill()
        proc.wait()


def walk(program: Path, *args: str, seconds: float = 3.0, **config: Any) -> tuple[Any, dict[str, int], int]:
    """Runs ``program`` profiled alone until its tables are loaded, then for ``seconds``: the
    profile, the kernel walker's counters and the truncated samples of those seconds."""
    with profiled(str(program), RUN_S, *args, **config) as (_, prof):
        prof.warm()
        profile = prof.measure(seconds)
        return profile, prof.kernel_stats(), prof.truncated()


def user_frames(sample: Any) -> list[Any]:
    return [f for f in sample.frames if f.frame_type != "kernel"]


def hot_samples(profile: Any, leaf: str) -> list[tuple[list[str], int]]:
    out = []
    for s in profile.samples:
        names = [f.function for f in user_frames(s)]
        if names and names[0] == leaf:
            out.append((names, s.count))
    return out


def share_with_chain(samples: list[tuple[list[str], int]], chain: list[str]) -> float:
    total = sum(n for _, n in samples)
    exact = sum(n for names, n in samples if names[:len(chain)] == chain)
    return exact / total if total else 0.0


def test_o2_chain_is_walked_whole_including_the_leafs_caller(bpf_ok: None, built: dict[str, Path],
                                                              tmp_path: Path) -> None:
    profile, kernel_stats, truncated = walk(built["chain"], seconds=4)
    hot = hot_samples(profile, "hot")
    assert sum(n for _, n in hot) >= 100, profile.samples[:5]
    share = share_with_chain(hot, CHAIN)
    assert share >= 0.95, collections.Counter(tuple(n) for n, _ in hot).most_common(3)
    # The chain goes on through libc to _start, where the table marks the end: not truncated.
    assert truncated == 0 and kernel_stats["walked"] > 0 and kernel_stats["truncated"] == 0, kernel_stats
    # pprof readers see the same: go tool pprof -traces on the written file
    from receiver.profiling.output.pprof import write_pprof

    path = tmp_path / "cpu.pb.gz"
    write_pprof(profile, path)
    assert pprof_traces_share(path, tmp_path, CHAIN) >= 0.95


def pprof_traces_share(path: Path, tmp_path: Path, chain: list[str]) -> float:
    """Share of the samples whose leaf is chain[0] that ``go tool pprof -traces`` shows with
    exactly ``chain`` from the leaf up."""
    p = subprocess.run(["go", "tool", "pprof", "-traces", "-symbolize=none", str(path)],
                       capture_output=True, text=True, env=go_env(tmp_path), timeout=240, check=False)
    assert p.returncode == 0, p.stderr
    total = exact = 0.0
    for block in re.split(r"^-+\+-+$", p.stdout, flags=re.M)[1:]:
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        first = next((i for i, ln in enumerate(lines) if re.match(r"^\s*[\d.]+(ms|s)\s+\S", ln)), None)
        if first is None:       # the labels of a sample come before its value line
            continue
        value_text, leaf = lines[first].split(None, 1)
        frames = [leaf.strip()] + [ln.strip() for ln in lines[first + 1:]]
        if frames[0] != chain[0]:
            continue
        value = float(value_text.rstrip("ms")) * (1 if value_text.endswith("ms") else 1000)
        total += value
        exact += value if frames[:len(chain)] == chain else 0
    assert total > 0, p.stdout[:2000]
    return exact / total


def test_frames_spread_over_pages_are_walked_whole(bpf_ok: None, built: dict[str, Path]) -> None:
    # The walk reads the stack in windows that end at a page's end; 600-byte frames shifted by
    # 16 to 4 048 bytes from call to call put return addresses everywhere relative to those
    # windows and pages. A window read past what it holds would name garbage.
    profile, kernel_stats, truncated = walk(built["chain"], "b", seconds=4)
    hot = hot_samples(profile, "hot")
    assert sum(n for _, n in hot) >= 100, profile.samples[:5]
    chain = ["hot", "g4", "g3", "g2", "g1", "shifted", "main"]
    assert share_with_chain(hot, chain) >= 0.95, collections.Counter(tuple(n) for n, _ in hot).most_common(3)
    assert truncated == 0 and kernel_stats["walked"] > 0 and kernel_stats["truncated"] == 0, kernel_stats


def test_stripped_binary_walks_the_same_depth(bpf_ok: None, built: dict[str, Path]) -> None:
    profile, _, _ = walk(built["chain_stripped"])
    depths = collections.Counter()
    for s in profile.samples:
        depths[len(user_frames(s))] += s.count
    # hot + f8..f1 + main + __libc_start_call_main + __libc_start_main + _start
    assert depths.most_common(1)[0][0] == 13, depths


def test_cxx_o2_methods_and_templates(bpf_ok: None, built: dict[str, Path]) -> None:
    profile, _, _ = walk(built["cxx"])
    samples = [([f.function for f in user_frames(s)], s.count) for s in profile.samples]
    spin = [(names, n) for names, n in samples if names and "Worker::spin" in names[0]]
    assert sum(n for _, n in spin) >= 50, samples[:5]
    expected = [f"Level<{i}>::go" for i in range(7)] + ["main"]
    good = sum(n for names, n in spin
               if len(names) > len(expected) and all(e in names[i + 1] for i, e in enumerate(expected)))
    assert good / sum(n for _, n in spin) >= 0.95, spin[:3]


def test_shared_library_without_frame_pointers(bpf_ok: None, built: dict[str, Path]) -> None:
    profile, _, _ = walk(built["lib_main"])
    hot = hot_samples(profile, "lib_hot")
    assert sum(n for _, n in hot) >= 50, profile.samples[:5]
    assert share_with_chain(hot, ["lib_hot", "lib_c", "lib_b", "lib_a", "main"]) >= 0.95, hot[:3]
    paths = {f.mapping.path for names_s in profile.samples for f in user_frames(names_s)[:1] if f.mapping}
    assert any(p.endswith("libdeep.so") for p in paths), paths


def test_code_without_cfi_stops_the_walk_and_is_counted(bpf_ok: None, built: dict[str, Path]) -> None:
    """No bogus frame: the walk stops in the function without call-frame information, and the
    stack is counted as truncated."""
    profile, kernel_stats, truncated = walk(built["chain"], "nocfi")
    hot = hot_samples(profile, "hot")
    assert sum(n for _, n in hot) >= 50
    for names, _ in hot:
        assert names[:2] == ["hot", "nocfi_mid"] and len(names) == 2, names
    assert truncated >= sum(n for _, n in hot) and kernel_stats["truncated"] > 0, kernel_stats


def test_a_table_that_does_not_fit_stops_the_walk_there(bpf_ok: None, built: dict[str, Path]) -> None:
    """With room for the program's own table but not libc's, walks reach main and stop in libc
    (truncated, counted) instead of guessing with frame pointers in code built without them."""
    with profiled(str(built["chain"]), RUN_S, unwind_table_rows=4096) as (_, prof):
        prof.warm()
        profile = prof.measure(3)
        stats = prof.sampler.unwinder.stats
        full = stats["tables_full"] + stats["tables_too_large"]
        truncated = prof.truncated()
    hot = hot_samples(profile, "hot")
    assert sum(n for _, n in hot) >= 50
    assert full >= 1
    for names, _ in hot:
        assert names[:len(CHAIN)] == CHAIN and names[len(CHAIN):] == ["__libc_start_call_main"], names
    assert truncated >= sum(n for _, n in hot)


def test_vdso_frames_are_walked_with_the_vdsos_own_table(bpf_ok: None, built: dict[str, Path]) -> None:
    """clock_gettime runs in the vdso (or enters the kernel from it): its table comes from the
    vdso image in the process's memory, so the walk goes on to clocky and main."""
    with profiled(str(built["chain"]), RUN_S, "clock") as (_, prof):
        prof.warm()
        profile = prof.measure(3)
        truncated = prof.truncated()
    total = in_vdso = through = 0
    for s in profile.samples:
        user = user_frames(s)
        total += s.count
        if user and user[0].mapping is not None and user[0].mapping.path == "[vdso]":
            in_vdso += s.count
            names = [f.function for f in user]
            if "clocky" in names and "main" in names:
                through += s.count
    assert in_vdso >= 20, total
    assert through / in_vdso >= 0.95 and truncated <= 0.05 * total, (through, in_vdso, truncated)


def test_exec_into_another_program_reloads_its_tables(bpf_ok: None, built: dict[str, Path]) -> None:
    """The exec clears the old mapping list in the kernel; the new image is announced, loaded,
    and walked with its own tables (never the old program's)."""
    with profiled(str(built["lib_main"]), RUN_S, str(built["chain"]), RUN_S) as (proc, prof):
        prof.warm()
        proc.send_signal(signal.SIGUSR1)
        unwinder, symbolizer = prof.sampler.unwinder, prof.sampler.symbolizer

        def reloaded() -> bool:   # announced again with the new image, and both passes done
            return (any(r[3].endswith("chain_o2") for r in symbolizer.executable_regions(proc.pid))
                    and unwinder.wait_idle(5) and unwinder.wait_idle(5))

        wait_until(reloaded, 60, 0.2, "the tables of the exec'd program")
        prof.sampler.drain()
        profile = prof.measure(3)
    hot = hot_samples(profile, "hot")
    assert sum(n for _, n in hot) >= 50, profile.samples[:3]
    assert share_with_chain(hot, CHAIN) >= 0.95, hot[:3]
    names = {f.function for s in profile.samples for f in user_frames(s)}
    assert not any(n.startswith("lib_") for n in names), names


def test_exec_drops_every_cpus_cached_copy_of_the_old_tables(bpf_ok: None, built: dict[str, Path]) -> None:
    """Each CPU keeps a copy of its last sampled process's table entries; an exec must drop it
    with the entries. With the new image's tables held back, its samples keep frame pointers:
    none is walked with the old program's mappings."""
    with profiled(str(built["lib_main"]), RUN_S, str(built["chain"]), RUN_S) as (proc, prof):
        prof.warm()
        unwinder = prof.sampler.unwinder
        # copies cached, in use (waited for: a loaded runner gives the program less than a core)
        wait_until(lambda: prof.kernel_stats()["walked"] >= 50, 30, 0.2, "50 walks with the tables")
        unwinder.request = lambda pid: None          # type: ignore[method-assign]  # no new tables
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: any(r[3].endswith("chain_o2") for r in prof.sampler.symbolizer.executable_regions(proc.pid)),
                   30, 0.1, "the exec'd program announced")
        before = prof.kernel_stats()
        # 100 samples of the new image (waited for: a loaded runner gives it less than a core)
        wait_until(lambda: prof.kernel_stats()["no_table"] - before["no_table"] >= 100, 60, 0.2,
                   "100 samples of the exec'd program")
        after = prof.kernel_stats()
    walked = after["walked"] - before["walked"]
    fallback = after["no_table"] - before["no_table"]
    assert fallback >= 100 and walked == 0, (walked, fallback)


Frame = tuple[str, int]   # (file, offset in the file): the same in perf's output and ours


def perf_dwarf_stacks(pid: int, seconds: float, tmp_path: Path) -> list[tuple[Frame, ...]]:
    """The user stacks ``perf record --call-graph dwarf`` sees in ``pid``, leaf first, each frame
    as (file, file offset). perf gives a caller as its return address - 1 (to name the call, not
    the next line); +1 makes it the return address, which is what our frames hold."""
    data = tmp_path / "perf.data"
    subprocess.run(["perf", "record", "-q", "-F", str(FREQUENCY), "--call-graph", "dwarf", "-p", str(pid),
                    "-o", str(data), "--", "sleep", str(seconds)], check=True, capture_output=True,
                   timeout=seconds + 120)
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,dso"], check=True,
                            capture_output=True, text=True, timeout=300).stdout
    stacks = []
    for block in script.split("\n\n"):
        frames: list[Frame] = []
        for line in block.splitlines():
            m = re.fullmatch(r"\s*([0-9a-f]+)\s+\((.*)\)\s*", line)
            if not m or m.group(2).startswith("[kernel"):
                continue
            # A frame perf names by a function inlined at it keeps its file, shown as "(inlined)".
            path = frames[-1][0] if m.group(2) == "inlined" and frames else m.group(2)
            frames.append((path, int(m.group(1), 16) + (1 if frames else 0)))
        if frames:
            stacks.append(tuple(frames))
    assert stacks, script[:2000]
    return stacks


def our_stacks(profile: Any) -> list[tuple[Frame, ...]]:
    """Our user stacks (one per sample), leaf first, frames as (file, file offset)."""
    out = []
    for s in profile.samples:
        frames = tuple((f.mapping.path, f.mapping.file_address(f.address)) if f.mapping else ("?", f.address)
                       for f in user_frames(s))
        out += [frames] * s.count
    return out


class Functions:
    """Where the functions of a file start, from its ``.eh_frame`` (kept in stripped files): a
    leaf frame's pc differs from sample to sample, its function does not."""

    def __init__(self) -> None:
        self._files: dict[str, list[tuple[int, int]]] = {}

    def _ranges(self, path: str) -> list[tuple[int, int]]:
        if path not in self._files:
            loads = [(int(m[1], 16), int(m[2], 16), int(m[3], 16)) for m in re.finditer(
                r"LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)",
                subprocess.run(["readelf", "-lW", path], capture_output=True, text=True, check=False).stdout)]
            frames = subprocess.run(["readelf", "--debug-dump=frames", path], capture_output=True, text=True,
                                    check=False).stdout
            self._files[path] = sorted((lo - vaddr + off, hi - vaddr + off)
                                       for lo, hi in ((int(a, 16), int(b, 16)) for a, b in
                                                      re.findall(r"FDE .*pc=([0-9a-f]+)\.\.([0-9a-f]+)", frames))
                                       for off, vaddr, size in loads if vaddr <= lo < vaddr + size)
        return self._files[path]

    def of(self, frame: Frame) -> Frame:
        """The function holding ``frame``, as (file, its first offset); the frame itself if none."""
        ranges = self._ranges(frame[0]) if frame[0].startswith("/") else []
        i = bisect.bisect_right(ranges, (frame[1], 1 << 64)) - 1
        return (frame[0], ranges[i][0]) if i >= 0 and frame[1] < ranges[i][1] else frame


def test_stripped_system_binary_depth_matches_perf_dwarf(bpf_ok: None, tmp_path: Path) -> None:
    """xz -9 (stripped, with the stripped liblzma, no frame pointers) walked by us and by
    ``perf record --call-graph dwarf`` over the same seconds. The two sample other instants, so
    stacks are compared where both can tell, and exactly, both ways. A stack is its leaf's
    function (the pc varies) and then its return addresses:

    - every stack of either ends at the same outermost frame (xz's ``_start``): neither stops
      short of where the other ends (shallower) nor walks past it (deeper);
    - the same frames: for each pair (frame, the next frame out) one side has, where the other
      saw both frames, the other has that pair too. A skipped, extra or wrong frame anywhere in
      a stack, the leaf's caller included, is a pair between two frames the other saw but never
      together. (A pair on a path only one side sampled has a frame the other never saw: not
      judged; most frames are on every path here.)
    Sampling and load cannot break either: every walk, ours and perf's, reaches ``_start`` on
    this workload, and its call graph is fixed."""
    if not shutil.which("perf"):
        pytest.fail("perf is not installed (make setup installs Debian's linux-perf)")
    data = tmp_path / "random.bin"
    data.write_bytes(os.urandom(96 << 20))
    with profiled("xz", "-9", "-T1", "-c", str(data)) as (proc, prof):
        prof.warm()
        theirs: list[list[tuple[Frame, ...]]] = []
        perf = threading.Thread(target=lambda: theirs.append(perf_dwarf_stacks(proc.pid, 4, tmp_path)))
        perf.start()
        profile = prof.measure(4)
        perf.join()
    assert theirs, "perf failed"
    functions = Functions()
    sides = {"ours": our_stacks(profile), "perf": theirs[0]}
    # xz has at least a tenth of a core however loaded the runner: 40 samples in 4 s each.
    assert all(len(stacks) >= 10 for stacks in sides.values()), {k: len(v) for k, v in sides.items()}
    depths = {k: sorted(collections.Counter(map(len, v)).items()) for k, v in sides.items()}
    roots = {k: {st[-1] for st in v} for k, v in sides.items()}
    assert len(roots["ours"]) == 1 and roots["ours"] == roots["perf"], (roots, depths)
    assert next(iter(roots["ours"]))[0].endswith("/xz"), roots
    nodes = {k: [(functions.of(st[0]), *st[1:]) for st in v] for k, v in sides.items()}
    seen = {k: {f for st in v for f in st} for k, v in nodes.items()}
    pairs = {k: {(a, b) for st in v for a, b in zip(st, [*st[1:], None])} for k, v in nodes.items()}
    for side, other in (("ours", "perf"), ("perf", "ours")):
        judged = {(a, b) for a, b in pairs[side] if a in seen[other] and (b is None or b in seen[other])}
        assert judged <= pairs[other], (f"{side} has pairs {other} never has", sorted(judged - pairs[other]),
                                        depths)
    # Not vacuous: most frames were seen by both.
    assert len(seen["ours"] & seen["perf"]) >= 0.5 * len(seen["ours"] | seen["perf"]), seen
