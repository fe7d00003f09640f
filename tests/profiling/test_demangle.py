"""C++ and Rust names in profiles are demangled by binutils' c++filt, cached; a real C++ program
profiled through EbpfCpuProfiler shows readable names."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from receiver.profiling.model import CpuProfile, Frame, Mapping, StackSample
from receiver.profiling.symbols.demangle import Demangler

from ..harness import compile_c

CPP_BURNER = r"""
#include <cstdlib>
#include <ctime>
namespace shop {
struct Cart {
    __attribute__((noinline)) long spin(int rounds) {
        volatile long x = 0;
        for (int i = 0; i < rounds; i++) x += i;
        return x;
    }
};
}
int main(int argc, char **argv) {
    double seconds = atof(argv[1]);
    shop::Cart cart;
    time_t end = time(nullptr) + (time_t)seconds + 1;
    while (time(nullptr) < end) cart.spin(100000);
    return 0;
}
"""


def test_cpp_and_rust_names() -> None:
    got = Demangler().names(["_ZN3foo3barEi", "_ZN4core3ptr13drop_in_place17h0123456789abcdefE",
                             "plain_c_function", "_ZN3foo3barEi"])
    assert got == {"_ZN3foo3barEi": "foo::bar(int)",
                   "_ZN4core3ptr13drop_in_place17h0123456789abcdefE": "core::ptr::drop_in_place::h0123456789abcdef"}


def test_profile_frames_renamed_and_cached() -> None:
    m = Mapping(0x400000, 0x500000, 0, "/usr/bin/app")
    mangled = Frame(0x401000, "_ZN3foo3barEi", "native", m)
    sample = StackSample((mangled, Frame(0x402000, "main", "native", m)), count=3, pid=1, tid=1)
    profile = CpuProfile(0, 1, 99, [sample])
    demangler = Demangler(max_entries=1)
    demangler.apply(profile)
    assert [f.function for f in sample.frames] == ["foo::bar(int)", "main"]
    assert sample.frames[0].address == 0x401000 and sample.frames[0].mapping == m
    assert len(demangler._cache) == 1


def test_without_cplusfilt_names_stay_as_they_are() -> None:
    assert Demangler(tool="").names(["_ZN3foo3barEi"]) == {"_ZN3foo3barEi": "_ZN3foo3barEi"}


def test_profiled_cpp_program_has_readable_names(bpf_ok: None, tmp_path: Path) -> None:
    from receiver.config import ProcessFilter, ProfilerSourceConfig
    from receiver.profiling.cpu_profiler import EbpfCpuProfiler

    binary = compile_c(CPP_BURNER, tmp_path / "cart_burner", "-O1", "-fno-omit-frame-pointer",
                       cxx=True)
    profiler = EbpfCpuProfiler(ProfilerSourceConfig(
        preset="development", filter=ProcessFilter(process_names=["cart_burner"]))).start()
    try:
        proc = subprocess.run([str(binary), "1"], timeout=30)
        assert proc.returncode == 0
        time.sleep(0.2)
    finally:
        profile = profiler.stop_profile()
    names = {f.function for s in profile.samples for f in s.frames}
    assert "shop::Cart::spin(int)" in names, sorted(names)[:20]
    assert not any(n.startswith("_ZN4shop") for n in names)
