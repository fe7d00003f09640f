"""In-memory aggregates that sources keep between reports and hand over in metric snapshots:
exponential histograms, the kernel's log2 histograms, and the bounded per-process series of
TCP connection metrics. No OTLP here: ``receiver.convert`` turns them into metrics."""

from __future__ import annotations

import math

__all__ = ["ExpHistogram", "HistPoint", "Series", "SeriesKey", "OVERFLOW_KEY", "ConnectionMetrics"]


# ------------------------------------------------------------------------------ exponential histogram

class ExpHistogram:
    """Base-2 exponential histogram of positive values, like the OpenTelemetry SDK's: starts at
    scale 20 and halves its resolution whenever more than ``max_size`` buckets would be needed."""

    __slots__ = ("scale", "buckets", "count", "sum", "min", "max", "zero_count", "max_size")

    def __init__(self, max_size: int = 160, scale: int = 20):
        self.scale = scale
        self.max_size = max_size
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0
        self.zero_count = 0

    def _index(self, value: float) -> int:
        # Bucket i covers (base^i, base^(i+1)] with base = 2^(2^-scale).
        return math.ceil(math.log2(value) * 2.0 ** self.scale) - 1

    def record(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if value <= 0:
            self.zero_count += 1
            return
        idx = self._index(value)
        if idx not in self.buckets and self.buckets:
            lo, hi = min(min(self.buckets), idx), max(max(self.buckets), idx)
            shift = 0
            while (hi >> shift) - (lo >> shift) + 1 > self.max_size:
                shift += 1
            if shift:
                merged: dict[int, int] = {}
                for i, n in self.buckets.items():
                    merged[i >> shift] = merged.get(i >> shift, 0) + n
                self.buckets = merged
                self.scale -= shift
                idx = self._index(value)
        self.buckets[idx] = self.buckets.get(idx, 0) + 1


# ------------------------------------------------------------------------------ aggregation

# (pid, direction, network.type, peer address or None, peer port or None)
SeriesKey = tuple[int, str, str, str | None, int | None]
OVERFLOW_KEY: SeriesKey = (0, "", "", None, None)


class Series:
    """Cumulative values of one attribute set of one process."""

    __slots__ = ("comm", "opened", "active", "closed", "duration", "sent", "received", "retransmits",
                 "resets_sent", "resets_received")

    def __init__(self, comm: str):
        self.comm = comm
        self.opened = 0
        self.active = 0
        self.closed: dict[str, int] = {}
        self.duration: dict[str, ExpHistogram] = {}
        self.sent = self.received = self.retransmits = self.resets_sent = self.resets_received = 0

    def add(self, sent: int, received: int, retransmits: int, resets_sent: int, resets_received: int) -> None:
        self.sent += sent
        self.received += received
        self.retransmits += retransmits
        self.resets_sent += resets_sent
        self.resets_received += resets_received


class ConnectionMetrics:
    """Per-process series of connection metrics, at most ``max_attribute_sets`` of them plus one
    overflow series (``otel.metric.overflow=true``) that takes everything beyond.

    Still-open connections are seen at each interval (``observe_active``); their counts so far are
    added then, and only the remainder when they finish, so the sums stay monotonic and exact."""

    def __init__(self, max_attribute_sets: int, peer_attributes: bool):
        self.max_attribute_sets = max_attribute_sets
        self.peer_attributes = peer_attributes
        self.series: dict[SeriesKey, Series] = {}
        # connection id → (series key, counts already added, scan generation when last seen)
        self._open: dict[tuple[int, int], tuple[SeriesKey, tuple[int, ...], int]] = {}
        self._generation = 0

    def open_connections(self) -> int:
        """Still-open connections whose counts so far were added (at most the kernel's map)."""
        return len(self._open)

    def key(self, pid: int, direction: str, net_type: str, peer_addr: str, peer_port: int) -> SeriesKey:
        if self.peer_attributes:
            return (pid, direction, net_type, peer_addr, peer_port)
        return (pid, direction, net_type, None, None)

    def _series(self, key: SeriesKey, comm: str) -> tuple[SeriesKey, Series]:
        s = self.series.get(key)
        if s is None:
            if len(self.series) >= self.max_attribute_sets + (OVERFLOW_KEY in self.series):
                key = OVERFLOW_KEY
                s = self.series.get(key)
                if s is None:
                    s = self.series[key] = Series("")
            else:
                s = self.series[key] = Series(comm)
        return key, s

    def begin_scan(self) -> None:
        """Starts a pass over the still-open connections: their ``active`` counts restart."""
        self._generation += 1
        for s in self.series.values():
            s.active = 0

    def observe_active(self, conn_id: tuple[int, int], key: SeriesKey, comm: str, counts: tuple[int, ...]) -> None:
        prev = self._open.get(conn_id)
        if prev is None:
            key, s = self._series(key, comm)
            s.opened += 1
            before: tuple[int, ...] = (0, 0, 0, 0, 0)
        else:
            key, before = prev[0], prev[1]
            s = self.series[key]
        s.active += 1
        s.add(*(now - was for now, was in zip(counts, before)))
        self._open[conn_id] = (key, counts, self._generation)

    def end_scan(self) -> None:
        """Forgets open connections not seen in the last two scans (their end record was lost)."""
        stale = [c for c, (_k, _n, g) in self._open.items() if g < self._generation - 1]
        for c in stale:
            del self._open[c]

    def observe_finished(self, conn_id: tuple[int, int], key: SeriesKey, comm: str, counts: tuple[int, ...],
                         outcome: str, duration_s: float) -> None:
        prev = self._open.pop(conn_id, None)
        if prev is None:
            key, s = self._series(key, comm)
            s.opened += 1
            s.add(*counts)
        else:
            key = prev[0]
            s = self.series[key]
            s.add(*(now - was for now, was in zip(counts, prev[1])))
        s.closed[outcome] = s.closed.get(outcome, 0) + 1
        h = s.duration.get(outcome)
        if h is None:
            h = s.duration[outcome] = ExpHistogram()
        h.record(duration_s)

    def forget_pids(self, pids: set[int]) -> None:
        """Drops the series of finished processes (after their final values went out)."""
        open_keys = {k for k, _n, _g in self._open.values()}
        for key in [k for k in self.series if k[0] in pids and k not in open_keys]:
            del self.series[key]

    def by_pid(self) -> dict[int, list[tuple[SeriesKey, Series]]]:
        out: dict[int, list[tuple[SeriesKey, Series]]] = {}
        for key, s in self.series.items():
            out.setdefault(key[0], []).append((key, s))
        return out


class HistPoint:
    """One syscall series' cumulative histogram: log2 slot → count (slot k: durations in
    [2^k, 2^(k+1)) ns; -1: zero), plus count/sum/min/max in ns."""

    __slots__ = ("slots", "count", "sum_ns", "min_ns", "max_ns")

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}
        self.count = 0
        self.sum_ns = 0
        self.min_ns = 0
        self.max_ns = 0
