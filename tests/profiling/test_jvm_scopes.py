"""HotSpot debug-information decoding without a JVM: UNSIGNED5 numbers (HotSpot's
CompressedReadStream, JDK 17's with no excluded byte and JDK 21+'s with one), written here as
HotSpot's ``UNSIGNED5::write_uint`` writes them and read back with the reader the compiled frames'
scopes go through (tests/profiling/test_jvm_e2e.py decodes real nmethods)."""

from __future__ import annotations

import pytest

from receiver.profiling.runtimes.hotspot import _unsigned5


def _write(value: int, x: int) -> bytes:
    """HotSpot's UNSIGNED5::write_uint (lg_H = 6, L = 256 - 64 - X, at most 5 bytes)."""
    low, out = 256 - 64 - x, bytearray()
    for i in range(5):
        if value < low or i == 4:
            out.append(x + value)
            return bytes(out)
        value -= low
        out.append(x + low + value % 64)
        value >>= 6
    raise AssertionError("unreachable")


@pytest.mark.parametrize("x", [0, 1])
def test_unsigned5_reads_what_hotspot_writes(x: int) -> None:
    values = [0, 1, 2, 190 - x, 191 - x, 192 - x, 255, 1000, 12345, 1 << 20, (1 << 31) - 1, (1 << 32) - 1]
    data = b"".join(_write(v, x) for v in values)
    at, got = 0, []
    for _ in values:
        v, at = _unsigned5(data, at, x)
        got.append(v)
    assert got == values and at == len(data)
    if x:
        assert 0 not in data            # JDK 21+: no zero byte in a stream


def test_unsigned5_rejects_what_is_not_there() -> None:
    with pytest.raises(ValueError):
        _unsigned5(b"", 0, 1)
    with pytest.raises(ValueError):
        _unsigned5(bytes([250]), 0, 1)   # a high byte whose continuation is cut off
    with pytest.raises(ValueError):
        _unsigned5(bytes([0]), 0, 1)     # an excluded byte
