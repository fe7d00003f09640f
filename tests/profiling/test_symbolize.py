"""Symbolization against real programs built here with gcc, real /proc and real /proc/kallsyms.

The programs print their own function addresses; ``nm``/``readelf``/``addr2line`` give the
sizes, build ids and file layout the symbolizer must agree with. No BPF: the addresses a BPF
stack map would hold are taken from the running programs themselves.
"""

from __future__ import annotations

import logging
import lzma
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from receiver.profiling.model import KERNEL_MAPPING_PATH, Frame
from receiver.profiling.symbols import symbolizer as symbolize_module
from receiver.profiling.symbols.elf import ElfError, parse_elf_bytes
from receiver.profiling.symbols.kallsyms import KernelSymbols
from receiver.profiling.symbols.symbolizer import Symbolizer

from ..harness import fail_or_skip

PROGRAM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((noinline)) int alpha_function(int n) {
    volatile int s = 0;
    for (int i = 0; i < n; i++) s += i * 3;
    return s;
}

__attribute__((noinline)) int beta_function(int n) {
    volatile int s = 1;
    for (int i = 0; i < n; i++) s ^= i * 7;
    return s;
}

static void wait_for_line(void) {
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return;
}

static void load(const char *path) {
    void *h = dlopen(path, RTLD_NOW);
    if (!h) { printf("error %s\n", dlerror()); return; }
    void *(*entry)(void) = (void *(*)(void))dlsym(h, "lib_entry");
    printf("lib %s %p\n", path, entry());
}

int main(int argc, char **argv) {
    printf("alpha_function %p\n", (void *)&alpha_function);
    printf("beta_function %p\n", (void *)&beta_function);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dlopen")) {
            load(argv[++i]);
        } else if (!strcmp(argv[i], "--dlopen-later")) {
            printf("ready\n"); fflush(stdout);
            wait_for_line();
            load(argv[++i]);
        } else if (!strcmp(argv[i], "--jit")) {
            char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(code, 0xc3, 4096);
            char path[64];
            snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
            FILE *f = fopen(path, "w");
            fprintf(f, "%lx 40 jit_compiled_function\n", (unsigned long)code);
            fprintf(f, "%lx 80 LazyCompile:*another_jit_function\n", (unsigned long)code + 0x100);
            fclose(f);
            printf("jit %p\n", (void *)code);
        } else if (!strcmp(argv[i], "--vdso")) {
            void *vdso = dlopen("linux-vdso.so.1", RTLD_LAZY | RTLD_NOLOAD);
            printf("vdso %p\n", vdso ? dlsym(vdso, "__vdso_clock_gettime") : NULL);
        } else if (!strcmp(argv[i], "--map-exec")) {
            int fd = open(argv[++i], O_RDONLY);
            void *p = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
            close(fd);
            printf("mapped %p\n", p);
        }
    }
    printf("ready\n"); fflush(stdout);
    while (fgetc(stdin) != EOF) {}
    return (alpha_function(10) + beta_function(10)) & 1;
}
"""

LIBRARY_C = r"""
__attribute__((noinline)) static int helper(int n) {
    volatile int s = SALT;
    for (int i = 0; i < n; i++) s += i;
    return s;
}

__attribute__((noinline)) int FUNCTION_NAME(int n) { return helper(n) + 1; }

void *lib_entry(void) { return (void *)&FUNCTION_NAME; }
"""

LIBRARY_COUNT = 4


@dataclass(frozen=True)
class Binaries:
    pie: Path
    no_pie: Path
    unstripped: Path      # the very file `stripped` was stripped from (same build id, layout)
    stripped: Path
    libraries: tuple[Path, ...]


def _run(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def build_id_of(path: Path) -> str:
    match = re.search(r"Build ID: ([0-9a-f]+)", _run("readelf", "-n", path))
    assert match, f"{path} has no build id"
    return match.group(1)


def function_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (ELF virtual address, size) for the FUNC symbols ``nm`` sees."""
    out = {}
    for line in _run("nm", "-S", "--defined-only", path).splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tT":
            out[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
    return out


def vaddr_of_file_offset(path: Path, file_offset: int) -> int:
    """Through ``readelf -l``: the ELF virtual address of a file offset in a LOAD segment."""
    for line in _run("readelf", "-lW", path).splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            offset, vaddr, filesz = int(fields[1], 16), int(fields[2], 16), int(fields[4], 16)
            if offset <= file_offset < offset + filesz:
                return file_offset - offset + vaddr
    raise AssertionError(f"file offset {file_offset:#x} is in no LOAD segment of {path}")


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> Binaries:
    if not shutil.which("gcc"):
        fail_or_skip("gcc is required to build the test programs")
    d = tmp_path_factory.mktemp("symbolize")
    (d / "program.c").write_text(PROGRAM_C)
    (d / "library.c").write_text(LIBRARY_C)
    # Aligned functions leave padding after them, which must stay unnamed.
    common = ["-O1", "-g", "-fno-omit-frame-pointer", "-falign-functions=32", "-Wl,--build-id"]
    _run("gcc", *common, "-fPIE", "-pie", "-o", d / "pie", d / "program.c", "-ldl")
    _run("gcc", *common, "-fno-pie", "-no-pie", "-o", d / "no_pie", d / "program.c", "-ldl")
    shutil.copy(d / "pie", d / "stripped")
    _run("strip", "-s", d / "stripped")
    libraries = []
    for i in range(LIBRARY_COUNT):
        lib = d / f"libdemo{i}.so"
        _run("gcc", *common, "-shared", "-fPIC", f"-DFUNCTION_NAME=library_function_{i}",
             f"-DSALT={i + 1}", "-o", lib, d / "library.c")
        libraries.append(lib)
    return Binaries(pie=d / "pie", no_pie=d / "no_pie", unstripped=d / "pie",   # same file
                    stripped=d / "stripped", libraries=tuple(libraries))


class Program:
    """A running test program and the addresses it printed."""

    def __init__(self, *args: str | Path) -> None:
        self.proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.addresses: dict[str, int] = {}
        self.read_until_ready()

    def read_until_ready(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            fields = line.split()
            if fields == ["ready"]:
                return
            assert fields[0] != "error", line
            if fields[0] == "lib":
                self.addresses[Path(fields[1]).name] = int(fields[2], 16)
            else:
                self.addresses[fields[0]] = int(fields[1], 16)
        raise AssertionError("the program exited before it was ready")

    def send_line(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def exit(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.exit()
        elif p.proc.stdout is not None:
            p.proc.stdout.close()
            if p.proc.stdin is not None:
                p.proc.stdin.close()
        Path(f"/tmp/perf-{p.pid}.map").unlink(missing_ok=True)


@pytest.fixture
def start(programs: list[Program]) -> Callable[..., Program]:
    def _start(*args: str | Path) -> Program:
        program = Program(*args)
        programs.append(program)
        return program
    return _start


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        fail_or_skip("symbolization tests read other processes' /proc entries: run as root")


def one(symbolizer: Symbolizer, pid: int, address: int, leaf: bool = True) -> Frame:
    """The frame of one user address, as the leaf or as a return address."""
    addrs = [address] if leaf else [0x10, address]
    return symbolizer.symbolize(pid, addrs, [])[-1]


def assert_names_function(symbolizer: Symbolizer, pid: int, runtime: int, size: int,
                          name: str, path: Path, build_id: str) -> None:
    """Start, middle and last byte of the function name it; so does the address just past
    its end when it is a return address (the call was the last instruction)."""
    for address in (runtime, runtime + size // 2, runtime + size - 1):
        frame = one(symbolizer, pid, address)
        assert (frame.function, frame.frame_type, frame.address) == (name, "native", address)
        assert frame.mapping is not None
        assert (frame.mapping.path, frame.mapping.build_id) == (str(path), build_id)
        assert frame.mapping.start <= address < frame.mapping.end
    returned_to = one(symbolizer, pid, runtime + size, leaf=False)
    assert (returned_to.function, returned_to.address) == (name, runtime + size)


@pytest.mark.parametrize("kind", ["pie", "no_pie"])
def test_executable_and_dlopened_library_functions(binaries: Binaries, start, kind: str) -> None:
    exe = getattr(binaries, kind)
    lib = binaries.libraries[0]
    program = start(exe, "--dlopen", lib)
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)

    exe_sizes, lib_sizes = function_sizes(exe), function_sizes(lib)
    for name in ("alpha_function", "beta_function"):
        runtime = program.addresses[name]
        if kind == "no_pie":
            assert runtime == exe_sizes[name][0], "a non-PIE executable runs at its link address"
        assert_names_function(symbolizer, program.pid, runtime, exe_sizes[name][1], name, exe,
                              build_id_of(exe))
    # Just past alpha_function is alignment padding, in no function.
    alpha_vaddr, alpha_size = exe_sizes["alpha_function"]
    assert alpha_vaddr + alpha_size not in {vaddr for vaddr, _ in exe_sizes.values()}
    assert one(symbolizer, program.pid, program.addresses["alpha_function"] + alpha_size
               ).function == ""
    runtime = program.addresses[lib.name]
    assert_names_function(symbolizer, program.pid, runtime, lib_sizes["library_function_0"][1],
                          "library_function_0", lib, build_id_of(lib))
    # The library's static helper sits at the same distance from library_function_0 as in the file.
    helper = runtime - lib_sizes["library_function_0"][0] + lib_sizes["helper"][0]
    assert one(symbolizer, program.pid, helper + 1).function == "helper"
    assert symbolizer.stats.frames_resolved > 0


def test_stacks_are_leaf_first_kernel_then_user(binaries: Binaries, start) -> None:
    program = start(binaries.pie)
    kernel = KernelSymbols()
    vfs_read = _kallsyms_address("vfs_read")
    symbolizer = Symbolizer(kernel_symbols=kernel)
    alpha, beta = program.addresses["alpha_function"], program.addresses["beta_function"]
    frames = symbolizer.symbolize(program.pid, [alpha + 2, beta + 5], [vfs_read + 3])
    assert [(f.function, f.frame_type) for f in frames] == [
        ("vfs_read", "kernel"), ("alpha_function", "native"), ("beta_function", "native")]
    assert [f.address for f in frames] == [vfs_read + 3, alpha + 2, beta + 5]


def _kallsyms_address(name: str) -> int:
    with open("/proc/kallsyms") as f:
        for line in f:
            fields = line.split()
            if fields[2] == name and fields[1] in "tT":
                return int(fields[0], 16)
    raise AssertionError(f"{name} is not in /proc/kallsyms")


def test_kernel_symbols_from_kallsyms() -> None:
    symbolizer = Symbolizer()
    notes = Path("/sys/kernel/notes").read_bytes()
    for name in ("vfs_read", "do_sys_openat2", "schedule"):
        address = _kallsyms_address(name)
        leaf, ret = symbolizer.symbolize(0, [], [address + 1, address + 1])
        assert (leaf.function, leaf.frame_type, leaf.address) == (name, "kernel", address + 1)
        assert ret.function == name, "a return address just past the function start"
        assert leaf.mapping is not None and leaf.mapping.path == KERNEL_MAPPING_PATH
        assert leaf.mapping.file_address(address) == address
        assert bytes.fromhex(leaf.mapping.build_id) in notes
    # A return address equal to a function's start belongs to the call in the function before.
    schedule = _kallsyms_address("schedule")
    before = symbolizer.symbolize(0, [], [schedule, schedule])
    assert before[0].function == "schedule" and before[1].function not in ("", "schedule")


def test_hidden_kernel_addresses_leave_frames_unresolved(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    hidden = tmp_path / "kallsyms"
    hidden.write_text("0000000000000000 T _stext\n0000000000000000 T vfs_read\n")
    with caplog.at_level(logging.WARNING):
        kernel = KernelSymbols(kallsyms_path=str(hidden))
        kernel.load()
    assert not kernel.available
    assert sum("kptr_restrict" in r.message for r in caplog.records) == 1
    symbolizer = Symbolizer(kernel_symbols=kernel)
    (frame,) = symbolizer.symbolize(0, [], [0xFFFFFFFF81234567])
    assert (frame.function, frame.address, frame.frame_type) == ("", 0xFFFFFFFF81234567, "kernel")
    assert frame.mapping is not None and frame.mapping.path == KERNEL_MAPPING_PATH


def test_short_lived_process_is_symbolized_after_it_exits(binaries: Binaries, start,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    lib = binaries.libraries[1]
    program = start(binaries.pie, "--dlopen", lib)
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    monkeypatch.setattr(symbolize_module, "REFRESH_AFTER_S", 0.0)
    assert program.proc.stdin is not None
    program.proc.stdin.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{program.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the program did not exit"
        time.sleep(0.01)
    # A miss re-reads the maps: a zombie's are empty, a reaped process has none; neither may
    # erase what was captured.
    assert one(symbolizer, program.pid, 0x10).mapping is None
    program.exit()
    assert not Path(f"/proc/{program.pid}").exists()
    reaped = start(binaries.pie)
    symbolizer.note_process(reaped.pid)
    reaped.exit()
    assert one(symbolizer, reaped.pid, 0x10).mapping is None
    assert one(symbolizer, reaped.pid, reaped.addresses["beta_function"]).function == \
        "beta_function"
    frames = symbolizer.symbolize(program.pid, [program.addresses["alpha_function"] + 1,
                                                program.addresses[lib.name] + 2], [])
    assert [f.function for f in frames] == ["alpha_function", "library_function_1"]
    assert frames[1].mapping is not None and frames[1].mapping.build_id == build_id_of(lib)


def test_deleted_library_is_read_through_map_files(binaries: Binaries, start,
                                                  tmp_path: Path) -> None:
    """An upgraded (deleted) library is still the mapped file under /proc/PID/map_files; the
    same path serves files in another mount namespace (containers)."""
    lib = tmp_path / "libdeleted.so"
    shutil.copy(binaries.libraries[3], lib)
    program = start(binaries.pie, "--dlopen", lib)
    build_id = build_id_of(lib)
    lib.unlink()
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    frame = one(symbolizer, program.pid, program.addresses[lib.name] + 1)
    assert frame.function == "library_function_3"
    assert frame.mapping is not None
    assert (frame.mapping.path, frame.mapping.build_id) == (str(lib), build_id)


def test_stripped_binary_keeps_address_path_build_id_and_file_offset(binaries: Binaries,
                                                                     start) -> None:
    program = start(binaries.stripped)
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    alpha = program.addresses["alpha_function"]
    frame = one(symbolizer, program.pid, alpha + 4)
    assert frame.function == "" and frame.address == alpha + 4
    assert frame.mapping is not None
    assert frame.mapping.path == str(binaries.stripped)
    assert frame.mapping.build_id == build_id_of(binaries.stripped) == build_id_of(
        binaries.unstripped)
    # What a backend would do: file offset -> ELF address -> the unstripped file's symbols.
    vaddr = vaddr_of_file_offset(binaries.stripped, frame.mapping.file_address(frame.address))
    assert vaddr == function_sizes(binaries.unstripped)["alpha_function"][0] + 4
    assert _run("addr2line", "-f", "-e", binaries.unstripped, hex(vaddr)).split()[0] == \
        "alpha_function"
    assert symbolizer.stats.frames_unresolved == 1


def test_stripped_binary_with_minidebuginfo_is_resolved(binaries: Binaries, start,
                                                         tmp_path: Path) -> None:
    """Fedora-style MiniDebugInfo: an xz-compressed ELF with .symtab in .gnu_debugdata."""
    debug = tmp_path / "symbols.debug"
    _run("objcopy", "--only-keep-debug", binaries.unstripped, debug)
    compressed = tmp_path / "symbols.xz"
    compressed.write_bytes(lzma.compress(debug.read_bytes(), format=lzma.FORMAT_XZ))
    exe = tmp_path / "minidebuginfo"
    shutil.copy(binaries.stripped, exe)
    _run("objcopy", f"--add-section=.gnu_debugdata={compressed}", exe)
    program = start(exe)
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    frame = one(symbolizer, program.pid, program.addresses["beta_function"] + 3)
    assert frame.function == "beta_function"
    assert frame.mapping is not None and frame.mapping.build_id == build_id_of(binaries.stripped)


def test_stripped_binary_is_resolved_from_its_debug_file(binaries: Binaries, start,
                                                         tmp_path: Path) -> None:
    """A debug file installed by build id (/usr/lib/debug/.build-id/ab/cdef.debug layout, as
    Debian's -dbgsym packages do) names the functions of the stripped binary."""
    build_id = build_id_of(binaries.stripped)
    debug = tmp_path / "debug" / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    debug.parent.mkdir(parents=True)
    _run("objcopy", "--only-keep-debug", binaries.unstripped, debug)
    program = start(binaries.stripped)
    without = Symbolizer(debug_dirs=())
    without.note_process(program.pid)
    assert one(without, program.pid, program.addresses["beta_function"] + 3).function == ""
    symbolizer = Symbolizer(debug_dirs=(str(tmp_path / "nothing"), str(tmp_path / "debug")))
    symbolizer.note_process(program.pid)
    frame = one(symbolizer, program.pid, program.addresses["beta_function"] + 3)
    assert frame.function == "beta_function"
    assert frame.mapping is not None and frame.mapping.path == str(binaries.stripped)
    assert frame.mapping.build_id == build_id


def test_jit_frames_from_perf_map(binaries: Binaries, start) -> None:
    program = start(binaries.pie, "--jit")
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    code = program.addresses["jit"]
    frames = symbolizer.symbolize(program.pid, [code + 0x10, code + 0x101, code + 0x200], [])
    assert [f.function for f in frames] == ["jit_compiled_function",
                                            "LazyCompile:*another_jit_function", ""]
    for f in frames:
        assert f.mapping is not None and f.mapping.path == f"/tmp/perf-{program.pid}.map"
        assert f.mapping.start <= code < f.mapping.end


def test_vdso_frames(binaries: Binaries, start) -> None:
    program = start(binaries.pie, "--vdso")
    clock_gettime = program.addresses["vdso"]
    assert clock_gettime, "the vdso exports __vdso_clock_gettime"
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    frame = one(symbolizer, program.pid, clock_gettime + 4)
    # The vdso exports the name twice (weak alias); the one without underscores is chosen.
    assert frame.function == "clock_gettime"
    assert frame.mapping is not None and frame.mapping.path == "[vdso]"
    assert re.fullmatch(r"[0-9a-f]{40}", frame.mapping.build_id)


def test_malformed_and_missing_things_give_unresolved_frames(binaries: Binaries, start,
                                                             tmp_path: Path) -> None:
    garbage = tmp_path / "not-elf.bin"
    garbage.write_bytes(b"\x7fELF\x02\x01\x01" + b"\xff" * 8185)   # 64-bit LE, absurd headers
    with pytest.raises(ElfError):
        parse_elf_bytes(garbage.read_bytes())
    program = start(binaries.pie, "--map-exec", garbage)
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    mapped = program.addresses["mapped"]
    frame = one(symbolizer, program.pid, mapped + 8)
    assert frame.function == "" and frame.mapping is not None
    assert (frame.mapping.path, frame.mapping.build_id) == (str(garbage), "")
    assert frame.mapping.file_address(mapped + 8) == 8
    assert symbolizer.stats.file_errors == 1
    # No mapping at all, and a pid that never existed: frames without mapping, no exception.
    assert one(symbolizer, program.pid, 0x10) == Frame(0x10, "", "native", None)
    assert symbolizer.symbolize(2**22 + 12345, [0x1234, 0x5678], []) == (
        Frame(0x1234, "", "native", None), Frame(0x5678, "", "native", None))


def test_dlopen_after_note_refreshes_the_maps(binaries: Binaries, start,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lib = binaries.libraries[2]
    program = start(binaries.pie, "--dlopen-later", lib)
    symbolizer = Symbolizer()
    symbolizer.note_process(program.pid)
    program.send_line()
    program.read_until_ready()
    address = program.addresses[lib.name]
    monkeypatch.setattr(symbolize_module, "REFRESH_AFTER_S", 3600.0)
    assert one(symbolizer, program.pid, address).mapping is None, "rate-limited: not yet re-read"
    monkeypatch.setattr(symbolize_module, "REFRESH_AFTER_S", 0.0)
    reads = symbolizer.stats.maps_reads
    assert one(symbolizer, program.pid, address).function == "library_function_2"
    assert symbolizer.stats.maps_reads == reads + 1
    # Known mappings answer without re-reading /proc/PID/maps.
    for _ in range(100):
        symbolizer.symbolize(program.pid, [program.addresses["alpha_function"], address + 1], [])
    assert symbolizer.stats.maps_reads == reads + 1


def test_file_cache_is_bounded_and_shared(binaries: Binaries, start) -> None:
    dlopens = [arg for lib in binaries.libraries for arg in ("--dlopen", lib)]
    first, second = start(binaries.pie, *dlopens), start(binaries.pie, *dlopens)

    def check(symbolizer: Symbolizer, program: Program) -> None:
        for i, lib in enumerate(binaries.libraries):
            frame = one(symbolizer, program.pid, program.addresses[lib.name] + 1)
            assert frame.function == f"library_function_{i}"
            assert frame.mapping is not None and frame.mapping.build_id == build_id_of(lib)
        assert one(symbolizer, program.pid, program.addresses["beta_function"]).function == \
            "beta_function"

    # Unbounded enough: the second process parses nothing new.
    shared = Symbolizer(max_files=64)
    shared.note_process(first.pid)
    parsed = shared.stats.file_cache_misses
    assert parsed >= LIBRARY_COUNT + 3       # executable, 4 libraries, libc, ld.so (and vdso)
    shared.note_process(second.pid)
    assert shared.stats.file_cache_misses == parsed
    assert shared.stats.file_cache_hits >= parsed
    check(shared, first)
    check(shared, second)

    # Fewer slots than files: evictions, re-parsing for the second process, right answers.
    small = Symbolizer(max_files=2)
    small.note_process(first.pid)
    small.note_process(second.pid)
    assert small.stats.file_cache_evictions >= 2 * parsed - 2
    assert small.stats.file_cache_misses >= 2 * parsed - 2
    check(small, first)
    check(small, second)


def test_process_bound_and_forget(binaries: Binaries, start) -> None:
    programs = [start(binaries.pie) for _ in range(3)]
    symbolizer = Symbolizer(max_processes=2)
    for p in programs:
        symbolizer.note_process(p.pid)
    assert symbolizer.stats.process_evictions == 1
    # The evicted one is read again on demand while it lives.
    assert one(symbolizer, programs[0].pid, programs[0].addresses["alpha_function"]).function \
        == "alpha_function"
    symbolizer.forget(programs[2].pid)
    programs[2].exit()
    assert one(symbolizer, programs[2].pid, programs[2].addresses["alpha_function"]).mapping \
        is None


def test_repeated_stacks_are_served_from_the_frame_cache(binaries: Binaries, start) -> None:
    program = start(binaries.pie)
    symbolizer = Symbolizer(max_cached_frames=1000)
    symbolizer.note_process(program.pid)
    alpha, beta = program.addresses["alpha_function"], program.addresses["beta_function"]
    stack = [alpha + 3, beta + 7, alpha + 9]
    first = symbolizer.symbolize(program.pid, stack, [])
    # Served from the cache means never named again: the naming path (maps, symbol tables) is
    # not entered once in 2000 repeats. Counted, not timed: a wall-clock bound per stack (it was
    # 200 µs) measures the runner's load as much as the cache.
    named = []
    make = symbolizer._user_frame
    symbolizer._user_frame = lambda proc, addr, is_return: named.append(addr) or make(proc, addr, is_return)
    cached = symbolizer._cached_frames
    for _ in range(2000):
        again = symbolizer.symbolize(program.pid, stack, [])
    assert all(a is b for a, b in zip(first, again)), "cached frames are the same objects"
    assert named == [] and symbolizer._cached_frames == cached, f"{len(named)} frames named again"
    del symbolizer._user_frame
    # Past the budget the caches are dropped, and answers stay right.
    text_start = first[0].mapping.start if first[0].mapping else 0
    for offset in range(1200):
        symbolizer.symbolize(program.pid, [text_start + offset], [])
    assert symbolizer._cached_frames <= 1000 + 2
    assert symbolizer.symbolize(program.pid, stack, []) == first


# ------------------------------------------------------------------ Go: .gopclntab

@pytest.mark.host   # the Go toolchain
@pytest.mark.parametrize("version,flags", [("host", ()), ("host", ("-buildmode=pie",)), ("1.21.13", ())],
                         ids=["host", "host-pie", "1.21"])
def test_go_frames_of_a_stripped_binary_with_inlined_calls(tmp_path: Path, version: str,
                                                           flags: tuple[str, ...]) -> None:
    """Names, files and lines from .gopclntab with no symbol table; a pc inside inlined calls
    is one frame per inlined function, innermost first, each at its own line."""
    from receiver.profiling.symbols.elf import read_elf_fd

    from .test_go_e2e import CHAIN_SOURCE, _go, _lines, go_build
    from .test_go_e2e import go_env as go_tool_env

    program = go_build(version, tmp_path / "chain", CHAIN_SOURCE, "-ldflags=-s -w", *flags)
    fd = os.open(program, os.O_RDONLY)
    try:
        elf = read_elf_fd(fd)
    finally:
        os.close(fd)
    assert len(elf.symbols) == 0 and elf.go is not None
    go = elf.go
    build_id = subprocess.run([str(_go("host")), "tool", "buildid", str(program)], capture_output=True, text=True,
                              check=True, env=go_tool_env(tmp_path)).stdout.strip()
    assert go.build_id == build_id
    funcs = {name: (entry, end) for entry, end, name, _, _ in go.functions()}
    entry, end = funcs["main.runLoop"]
    inlined = next(pc for pc in range(entry, end) if len(go.frames(pc)) == 3)
    lines = _lines(CHAIN_SOURCE)
    names = [(f.function, f.line) for f in go.frames(inlined)]
    assert names == [("main.stage1", lines["stage2"]), ("main.dispatch", lines["stage1"]),
                     ("main.runLoop", lines["dispatch"])]
    assert all(f.file.endswith("/main.go") for f in go.frames(inlined))
    assert go.frames(funcs["main.goHotA"][0])[0].function == "main.goHotA"
    assert go.frames(go.end) == [] and go.frames(go.start - 1) == []

    # The symbolizer, on the running program: its bias applied, Go frames expanded.
    proc = subprocess.Popen([str(program), "60"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                "x" in line.split()[1] and line.rstrip().endswith(str(program))
                for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines()):
            time.sleep(0.01)      # until exec has mapped the program's code
        s = Symbolizer()
        s.note_process(proc.pid)
        region = next(r for r in s.executable_regions(proc.pid) if r[3] == str(program))
        bias = region[2]
        assert bias is not None
        frames = s.symbolize(proc.pid, [funcs["main.goHotA"][0] + 3 + bias, inlined + 1 + bias], [])
    finally:
        proc.kill()
        proc.wait()
    assert [f.function for f in frames] == ["main.goHotA", "main.stage1", "main.dispatch", "main.runLoop"]
    assert {f.frame_type for f in frames} == {"go"}
    assert frames[1].address == frames[3].address == inlined + 1 + bias
    assert frames[0].mapping is not None and frames[0].mapping.go_build_id == build_id


@pytest.mark.host   # the Go toolchain
def test_corrupt_go_tables_raise_their_error_and_never_crash_naming(tmp_path: Path) -> None:
    import random

    from receiver.profiling.symbols.elf import named_sections
    from receiver.profiling.symbols.gopclntab import GoTableError, parse_go_table
    from receiver.profiling.unwind.go_table import go_unwind_table

    from .test_go_e2e import CHAIN_SOURCE, go_build

    image = bytearray(go_build("host", tmp_path / "chain", CHAIN_SOURCE, "-ldflags=-s -w").read_bytes())
    sections, is_dyn = named_sections(lambda o, n: bytes(image[o:o + n]))
    _, addr, offset, size = sections[b".gopclntab"]
    rng = random.Random(28)
    for trial in range(40):
        bad = bytearray(image)
        if trial % 4 == 0:
            del bad[offset + rng.randrange(size):offset + size]          # cut short
        else:
            for _ in range(200):
                bad[offset + rng.randrange(size)] = rng.randrange(256)
        try:
            go = parse_go_table(lambda o, n, b=bad: bytes(b[o:o + n]), sections, is_dyn)
        except GoTableError:
            continue
        assert go is not None
        for pc in range(go.start, go.end, max(1, (go.end - go.start) // 300)):
            go.frames(pc)         # may be wrong names in a corrupt table, but never an exception
        try:
            go_unwind_table(go)
        except GoTableError:
            pass
