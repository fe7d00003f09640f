"""``bpf_ktime_get_ns()`` (CLOCK_MONOTONIC) to Unix time."""

from __future__ import annotations

import time

__all__ = ["KernelClock"]


class KernelClock:
    """Maps kernel monotonic nanoseconds to Unix nanoseconds; re-anchored on every ``refresh()``
    so wall-clock steps (NTP) are followed."""

    def __init__(self) -> None:
        self.offset_ns = 0
        self.refresh()

    def refresh(self) -> None:
        # Read both clocks back to back, three times, keeping the tightest pair.
        best: tuple[int, int] | None = None
        for _ in range(3):
            m0 = time.monotonic_ns()
            w = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, w - (m0 + m1) // 2)
        assert best is not None
        self.offset_ns = best[1]

    def to_unix_nano(self, ktime_ns: int) -> int:
        return ktime_ns + self.offset_ns
