"""The runtime seam: a runtime registered in the table is recognised, gets its kernel entry, has
its walker tail-called after the native walk, announces and names its frames, and is forgotten
with its process — shown with a fake runtime, in user space alone and with real BPF."""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.config import CachesConfig, ProcessFilter, ProfilerSourceConfig
from receiver.kernel.bcc import bpf_source_dir
from receiver.profiling import sampler as sampler_module
from receiver.profiling.abi import RUNTIME_AUX_LAST, RUNTIME_SLOTS, RuntimeProcess
from receiver.profiling.model import Frame
from receiver.profiling.runtimes import RUNTIMES, Runtime, Runtimes, slot_of

from ..harness import compile_c, wait_until

MAGIC = 0x5EED_0000_0000

# A walker of the fake runtime: one frame per sample, the sampled thread's id xor the magic
# number user space gave the process as its data.
FAKE_WALKER = r"""
BPF_PERCPU_ARRAY(fake_stats, u64, 1);

int walk_fake(struct bpf_perf_event_data *ctx) {
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    if (!ws || !st)
        return 0;
    runtime_record(ws, st, ws->rt.data[0] ^ ws->key.tid, RUNTIME_AUX_LAST);
    u32 zero = 0;
    u64 *n = fake_stats.lookup(&zero);
    if (n)
        (*n)++;
    finish_walk(ctx, ws, st);
    return 0;
}
"""

SPIN_C = r"""
#include <stdlib.h>
static volatile unsigned long sink;
__attribute__((noinline)) void spin(void) { for (;;) sink++; }
int main(void) { spin(); return 0; }
"""


class FakeRuntime(Runtime):
    name = "fake"
    frame_type = "fake"
    bpf_header = "runtimes/fake.bpf.h"
    program = "walk_fake"
    stats_map = "fake_stats"
    stat_names = ("walked",)
    target = -1                               # the one pid it claims

    def __init__(self, bpf: Any, caches: CachesConfig) -> None:
        super().__init__(bpf, caches)
        self.noticed: set[tuple[int, int]] = set()
        self.forgotten: list[int] = []

    @classmethod
    def enabled(cls, config: ProfilerSourceConfig) -> bool:
        return True

    def recognise(self, pid: int, regions: Any) -> bytes | None:
        return struct.pack("<Q", MAGIC) if pid == self.target else None

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)

    def notice(self, pid: int, frame_id: int) -> None:
        self.noticed.add((pid, frame_id))

    def frames(self, pid: int, recorded: Any) -> list[tuple[Frame, bool]]:
        return [(Frame(0, f"fake_thread_{fid ^ MAGIC}", self.frame_type), bool(aux & RUNTIME_AUX_LAST))
                for fid, aux in recorded]


class FakeMap(dict):
    """What ``Runtimes`` uses of a BCC table."""

    class Key(int):
        pass

    def __init__(self, full: bool = False) -> None:
        super().__init__()
        self.full = full

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.full:
            raise OSError("E2BIG")
        super().__setitem__(int(key), bytes(value))

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(int(key))


def test_registered_runtime_gets_a_slot_after_the_native_walker() -> None:
    table = (*RUNTIMES, FakeRuntime)
    slots = [slot_of(table, cls) for cls in table]
    assert slots == list(range(1, len(table) + 1)) and max(slots) < RUNTIME_SLOTS
    assert len({cls.name for cls in table}) == len(table)


def test_runtimes_keep_the_kernel_entry_in_step_and_route_frames() -> None:
    FakeRuntime.target = 4242
    bpf = {"runtime_processes": FakeMap()}
    runtimes = Runtimes(bpf, [(3, FakeRuntime)], CachesConfig()).start()
    fake = runtimes.named("fake")
    assert isinstance(fake, FakeRuntime)
    runtimes.load(99, [])                                   # not its process
    runtimes.load(4242, [])
    entry = RuntimeProcess.from_buffer_copy(bpf["runtime_processes"][4242])
    assert list(bpf["runtime_processes"]) == [4242] and entry.runtime == 3 and entry.data[0] == MAGIC
    assert fake.stats["processes_loaded"] == 1
    runtimes.notice(3, 4242, 7)
    runtimes.notice(5, 4242, 8)                             # no runtime in slot 5: ignored
    assert fake.noticed == {(4242, 7)}
    native = (Frame(0x10, "spin", "native"), Frame(0x20, "main", "native"))
    placed = runtimes.place(3, 4242, native, [(MAGIC ^ 11, RUNTIME_AUX_LAST)], count=2)
    assert [f.function for f in placed] == ["fake_thread_11", "spin", "main"] and placed[0].frame_type == "fake"
    assert runtimes.place(6, 4242, native, [(1, 0)], count=1) == native
    runtimes.forget(4242)
    runtimes.forget(99)                                     # never loaded: nothing to do
    assert not bpf["runtime_processes"] and fake.forgotten == [4242]


def test_a_full_kernel_map_leaves_the_process_native_and_is_counted() -> None:
    FakeRuntime.target = 7
    runtimes = Runtimes({"runtime_processes": FakeMap(full=True)}, [(1, FakeRuntime)], CachesConfig())
    runtimes.load(7, [])
    fake = runtimes.named("fake")
    assert fake is not None and fake.stats["processes_over_limit"] == 1 and fake.forgotten == [7]


def test_fake_runtime_walker_runs_in_the_kernel(bpf_ok: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake runtime added to a copy of bpf/ and to the table: its walker is compiled in,
    tail-called after the native walk for the process it claims (and only that one), its frame
    ids announced over the ring buffer, its frames placed on the leaf side of the native ones,
    its kernel counter read, and the process forgotten after it exits."""
    tree = tmp_path / "bpf"
    shutil.copytree(bpf_source_dir(), tree)
    (tree / FakeRuntime.bpf_header).write_text(FAKE_WALKER)
    monkeypatch.setenv("EBPF_RECEIVER_BPF_DIR", str(tree))
    monkeypatch.setattr(sampler_module, "RUNTIMES", (*RUNTIMES, FakeRuntime))
    spin = compile_c(SPIN_C, tmp_path / "spin", "-O2", "-fno-omit-frame-pointer")
    proc = subprocess.Popen([str(spin)])
    other = subprocess.Popen([str(spin)])
    FakeRuntime.target = proc.pid
    sampler = sampler_module.CpuSampler(ProfilerSourceConfig(
        preset="development", frequency=99, report_interval=2.0,
        filter=ProcessFilter(pids=[proc.pid, other.pid])))
    stop = threading.Event()
    try:
        assert [cls for _, cls in sampler.enabled_runtimes][-1] is FakeRuntime
        bpf = sampler.load()
        sampler.bind(bpf)
        bpf["events"].open_ring_buffer(lambda _c, data, _s: sampler.on_record(data))
        def poll() -> None:
            while not stop.is_set():
                bpf.ring_buffer_poll(50)

        threading.Thread(target=poll, daemon=True).start()
        fake = sampler.runtime("fake")
        assert isinstance(fake, FakeRuntime)
        wait_until(lambda: fake.stats["processes_loaded"] >= 1 and sampler.unwinder.wait_idle(5), 60, 0.2,
                   "the fake runtime's process entry")
        sampler.drain()
        wait_until(lambda: (proc.pid, proc.pid ^ MAGIC) in fake.noticed, 30, 0.2, "the frame notice")
        time.sleep(3)
        profile = sampler.drain()
        ours = [s for s in profile.samples if s.pid == proc.pid]
        theirs = [s for s in profile.samples if s.pid == other.pid]
        assert ours and theirs
        for s in ours:
            user = [f for f in s.frames if f.frame_type != "kernel"]
            assert user[0] == Frame(0, f"fake_thread_{proc.pid}", "fake"), user[:3]
            assert [f.function for f in user[1:3]] == ["spin", "main"]
        assert all(f.frame_type != "fake" for s in theirs for f in s.frames)
        assert sampler.runtime_stats("fake")["walked"] >= sum(s.count for s in ours) > 0
        proc.kill()
        proc.wait()
        sampler.drain()                                     # finds it gone
        sampler.drain()                                     # forgets it
        wait_until(lambda: sampler.unwinder.wait_idle(5) and proc.pid in fake.forgotten, 30, 0.2,
                   "the exited process forgotten")
    finally:
        stop.set()
        for p in (proc, other):
            p.kill()
            p.wait()
        sampler.close()


def test_every_runtime_names_its_parts() -> None:
    """A table row is all a runtime needs: its walker header exists, its caches are fixed labels."""
    from receiver.telemetry import CACHES

    for cls in RUNTIMES:
        assert (bpf_source_dir() / cls.bpf_header).is_file(), cls.bpf_header
        assert f"int {cls.program}(struct bpf_perf_event_data *ctx)" in (bpf_source_dir() / cls.bpf_header).read_text()
        assert set(cls.caches) <= set(CACHES), f"add {cls.name}'s caches to telemetry.CACHES"
        assert cls.frame_type and cls.name
