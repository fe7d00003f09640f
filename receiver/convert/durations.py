"""Request/call duration histograms, shared by HTTP (``http.*.request.duration``) and gRPC
(``rpc.*.call.duration``): the cumulative explicit-bucket series per process and attribute set
the source keeps, with one overflow series per side beyond ``max_attribute_sets``, and their
conversion to OTLP metrics. A series key is a tuple whose first item is the side (True: server).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
)

from ..records import DurationSeries, DurationSnapshot
from .attributes import to_key_values

__all__ = ["CUMULATIVE", "DURATION_BOUNDARIES", "DurationHistograms", "duration_metrics"]

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
# The semantic conventions' advice for http.*.request.duration (seconds).
DURATION_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class DurationHistograms:
    """Cumulative duration histograms per process and attribute set, at most
    ``max_attribute_sets`` of them; beyond, one overflow series per side (under pid 0, its key
    ``overflow_key(key)``)."""

    def __init__(self, max_attribute_sets: int, overflow_key: Callable[[Any], Any]):
        self.max_attribute_sets = max_attribute_sets
        self._overflow_key = overflow_key
        # (pid, key) → [bucket counts, sum, count]
        self.series: dict[tuple[int, Any], list[Any]] = {}
        self.comms: dict[int, str] = {}
        self.overflowed = 0   # observations that went to an overflow series

    def observe(self, pid: int, comm: str, key: Any, seconds: float) -> None:
        s = self.series.get((pid, key))
        if s is None:
            if len(self.series) >= self.max_attribute_sets:
                pid, key = 0, self._overflow_key(key)
                self.overflowed += 1
                s = self.series.get((pid, key))
            if s is None:
                s = self.series[(pid, key)] = [[0] * (len(DURATION_BOUNDARIES) + 1), 0.0, 0]
                if pid:
                    self.comms.setdefault(pid, comm)
        s[0][bisect.bisect_left(DURATION_BOUNDARIES, seconds)] += 1
        s[1] += seconds
        s[2] += 1

    def by_pid(self) -> dict[int, DurationSeries]:
        out: dict[int, DurationSeries] = {}
        for (pid, key), (counts, total, count) in self.series.items():
            series = out.get(pid)
            if series is None:
                series = out[pid] = DurationSeries(self.comms.get(pid, ""))
            series.points.append((key, counts, total, count))
        return out

    def forget_pids(self, pids: set[int]) -> None:
        for k in [k for k in self.series if k[0] in pids]:
            del self.series[k]
        for pid in pids:
            self.comms.pop(pid, None)


def duration_metrics(snapshot: DurationSnapshot, attributes: Callable[[Any], dict[str, Any]],
                     sides: tuple[tuple[bool, str, str], ...]) -> Iterator[tuple[int, list[Metric]]]:
    """(pid, metrics) for every process of a snapshot (pid 0: the overflow series): one histogram
    metric per (server side, name, description) of ``sides`` that has points."""
    bounds = list(snapshot.boundaries)
    for pid, series in snapshot.by_pid.items():
        out = []
        for server, name, description in sides:
            points = [HistogramDataPoint(attributes=to_key_values(attributes(key)),
                                         start_time_unix_nano=snapshot.start_unix_nano,
                                         time_unix_nano=snapshot.time_unix_nano, count=count, sum=total,
                                         bucket_counts=counts, explicit_bounds=bounds)
                      for key, counts, total, count in series.points if key[0] == server]
            if points:
                m = Metric(name=name, description=description, unit="s")
                m.histogram.CopyFrom(Histogram(aggregation_temporality=CUMULATIVE))
                m.histogram.data_points.extend(points)
                out.append(m)
        yield pid, out
