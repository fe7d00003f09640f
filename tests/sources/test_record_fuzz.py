"""The ring-buffer record decoders of every source against arbitrary bytes of any length: each
record is decoded or counted as ``decode_error``, never a crash. Records are laid out to end
exactly at a page followed by an inaccessible one, so reading past a record's end faults."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.config import EbpfConfig
from receiver.kernel.clock import KernelClock
from receiver.pipeline import Pipeline, ProcessResources
from receiver.sources.base import SourceContext
from receiver.telemetry import SelfTelemetry

from ..harness import examples

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0


class _GuardedBuffer:
    """Two pages; the second is PROT_NONE."""

    def __init__(self, pages: int = 4) -> None:
        self.size = pages * PAGE
        self.map = mmap.mmap(-1, self.size + PAGE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        assert _libc.mprotect(self.base + self.size, PAGE, PROT_NONE) == 0, ctypes.get_errno()

    def place(self, data: bytes) -> int:
        """Copies ``data`` to end at the guard page; returns its address."""
        addr = self.base + self.size - len(data)
        ctypes.memmove(addr, data, len(data))
        return addr


_GUARD = _GuardedBuffer()


class _Exporter:
    def __init__(self) -> None:
        self.items = 0

    def submit(self, signal: Any, resource: Any, item: Any) -> bool:
        self.items += 1
        return True

    def submit_request(self, signal: Any, request: Any) -> bool:
        self.items += 1
        return True


def _source(name: str) -> Any:
    from receiver.sources import source_classes

    config = EbpfConfig.default()
    # Through the pipeline too: decoded records are converted as the agent converts them.
    pipeline = Pipeline(config, _Exporter(), ProcessResources({"service.name": "fuzz"}))
    ctx = SourceContext(config, pipeline, SelfTelemetry(), KernelClock())
    return source_classes()[name](ctx)


def _count(src: Any, metric: str, **labels: str) -> float:
    total = 0.0
    for fam in getattr(src.ctx.telemetry, metric).collect():
        for s in fam.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


FUZZ = settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Arbitrary bytes, or arbitrary bytes behind a valid record type (to reach the decoders' depth).
RECORDS = st.one_of(st.binary(max_size=3 * PAGE),
                    st.tuples(st.integers(0, 5), st.binary(max_size=3 * PAGE)).map(
                        lambda t: t[0].to_bytes(4, "little") + t[1]))


@pytest.mark.parametrize("name", ["process", "syscalls", "network", "profiler", "http"])
def test_fuzz_ring_buffer_records(name: str) -> None:
    try:
        src = _source(name)
    except ImportError as e:   # the profiler's sampler needs nothing from BCC to decode
        pytest.fail(f"source {name} cannot be built without BPF: {e}")
    callback = src._make_ring_callback()
    counts_received = name != "profiler"   # the profiler counts samples when it drains

    @FUZZ
    @given(RECORDS)
    def one(data: bytes) -> None:
        before = (_count(src, "events_received", source=name),
                  _count(src, "events_lost", source=name, reason="decode_error"))
        assert callback(None, _GUARD.place(data), len(data)) == 0
        after = (_count(src, "events_received", source=name),
                 _count(src, "events_lost", source=name, reason="decode_error"))
        if counts_received:
            assert (after[0] - before[0]) + (after[1] - before[1]) == 1, (before, after, len(data))

    one()
