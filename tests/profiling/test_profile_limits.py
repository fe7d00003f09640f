"""Size limits of profiles: an interval is built as requests split by process while one is over
``max_request_bytes``, each with its own compact dictionary, and the library's session profile
keeps a bounded number of distinct stacks."""

from __future__ import annotations

from receiver.convert.profiles import profile_requests
from receiver.pipeline import ProcessResources
from receiver.profiling.model import CpuProfile, Frame, Mapping, StackSample

LIMIT = 4096
RESOURCES = ProcessResources({"host.name": "test"})


def _profile(pids: int, stacks_per_pid: int) -> CpuProfile:
    samples = []
    for pid in range(100, 100 + pids):
        m = Mapping(0x400000, 0x500000, 0, f"/usr/bin/app{pid}", build_id=f"{pid:040x}")
        for i in range(stacks_per_pid):
            frames = tuple(Frame(0x400000 + 16 * (i * 8 + d), f"fn_{pid}_{i}_{d}", "native", m) for d in range(8))
            samples.append(StackSample(frames, count=i + 1, pid=pid, tid=pid, thread_name=f"app{pid}",
                                       process_name=f"app{pid}"))
    return CpuProfile(1_700_000_000_000_000_000, 10_000_000_000, 99, samples)


def _sample_total(requests: list) -> int:
    return sum(v for r in requests for rp in r.resource_profiles for sp in rp.scope_profiles
               for p in sp.profiles for s in p.samples for v in s.values)


def test_small_interval_is_one_request() -> None:
    profile = _profile(pids=2, stacks_per_pid=2)
    requests = profile_requests(profile, RESOURCES.get, LIMIT)
    assert len(requests) == 1
    assert _sample_total(requests) == profile.total_samples


def test_large_interval_is_split_by_process_under_the_limit() -> None:
    profile = _profile(pids=6, stacks_per_pid=6)
    requests = profile_requests(profile, RESOURCES.get, LIMIT)
    assert len(requests) > 1
    assert all(r.ByteSize() <= LIMIT for r in requests), [r.ByteSize() for r in requests]
    assert _sample_total(requests) == profile.total_samples
    seen = [rp.resource for r in requests for rp in r.resource_profiles]
    assert len(seen) == 6          # each process in exactly one request


def test_library_session_keeps_a_bounded_number_of_stacks() -> None:
    """EbpfCpuProfiler keeps the whole session, but no more than max_unique_stacks distinct
    (thread, stack) keys; samples beyond are counted, not kept."""
    from receiver.profiling.cpu_profiler import EbpfCpuProfiler

    profiler = EbpfCpuProfiler()
    profiler.max_unique_stacks = 10
    profile = _profile(pids=3, stacks_per_pid=6)      # 18 distinct stacks
    profiler._merge(profile)
    profiler._merge(profile)                          # the same again: counts add up
    kept = sum(s.count for s in profiler._merged.values())
    assert len(profiler._merged) == 10
    assert kept + profiler.samples_over_bound == 2 * profile.total_samples
