"""``CpuProfile`` ⇄ pprof (``perftools.profiles.Profile``), the format ``go tool pprof`` reads.

Two sample types, ``samples/count`` and ``cpu/nanoseconds`` (count × period), so pprof shows CPU
time by default and raw counts with ``-sample_index=samples``. Each distinct ``Frame`` is one
location; an unresolved frame is a location with its address and mapping but no line, so pprof
shows the address and can symbolize it later from the mapping's file and build id. Thread and
process identity ride on per-sample labels (OpenTelemetry attribute names), so ``from_pprof``
restores the model and ``go tool pprof -tags`` shows them. A Python frame is an ordinary
location (no mapping) with one line: function = qualified name and file, line = line number;
``from_pprof`` reads such a location back as a ``cpython`` frame.

An off-CPU profile (``sample_type`` ``off_cpu``) has one sample type, ``off_cpu/nanoseconds``
(period 1 ns): each value is the estimated time off the CPU, so ``go tool pprof
-sample_index=off_cpu`` shows where threads waited.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

from ...proto import profile_pb2
from .. import links
from ..model import KERNEL_MAPPING_PATH, OFF_CPU, CpuProfile, Frame, Mapping, StackSample

__all__ = ["to_pprof", "from_pprof", "write_pprof", "read_pprof", "frame_mapping", "KERNEL_MAPPING"]

# Kernel frames the symbolizer left without a mapping share this one (covering every address).
KERNEL_MAPPING = Mapping(start=0, end=(1 << 64) - 1, file_offset=0, path=KERNEL_MAPPING_PATH)

LABEL_TID = "thread.id"
LABEL_THREAD_NAME = "thread.name"
LABEL_PID = "process.pid"
LABEL_PROCESS_NAME = "process.executable.name"
LABEL_CONTAINER_ID = "container.id"
LABEL_TRACE_ID = "trace_id"      # request links: the served request's trace (hex), for -tagfocus
LABEL_SPAN_ID = "span_id"        # ... and its SERVER span id (hex, as exported)
_OURS = frozenset({LABEL_TID, LABEL_THREAD_NAME, LABEL_PID, LABEL_PROCESS_NAME, LABEL_CONTAINER_ID,
                   LABEL_TRACE_ID, LABEL_SPAN_ID})   # any other string label is a goroutine label


def frame_mapping(frame: Frame) -> Mapping | None:
    """The frame's mapping; kernel frames without one get ``KERNEL_MAPPING``."""
    if frame.mapping is None and frame.frame_type == "kernel":
        return KERNEL_MAPPING
    return frame.mapping


class _Strings:
    """pprof's string table: index 0 is ""; each string stored once."""

    def __init__(self, table: list[str]):
        self.table = table
        self._index = {"": 0}
        table.append("")

    def __call__(self, s: str) -> int:
        i = self._index.get(s)
        if i is None:
            i = self._index[s] = len(self.table)
            self.table.append(s)
        return i


def to_pprof(profile: CpuProfile) -> profile_pb2.Profile:
    """The profile as a pprof ``Profile`` (ids start at 1; strings, functions, locations and
    mappings each appear once)."""
    table: list[str] = []
    s = _Strings(table)
    period = profile.period_ns
    off_cpu = profile.sample_type == OFF_CPU
    if off_cpu:
        types = [profile_pb2.ValueType(type=s(OFF_CPU), unit=s("nanoseconds"))]
    else:
        types = [profile_pb2.ValueType(type=s("samples"), unit=s("count")),
                 profile_pb2.ValueType(type=s("cpu"), unit=s("nanoseconds"))]
    out = profile_pb2.Profile(
        sample_type=types, period_type=profile_pb2.ValueType(type=s(OFF_CPU if off_cpu else "cpu"),
                                                             unit=s("nanoseconds")),
        period=period, time_nanos=profile.start_unix_nano, duration_nanos=profile.duration_ns)
    mapping_ids: dict[Mapping, int] = {}
    function_ids: dict[tuple[str, str], int] = {}
    location_ids: dict[Frame, int] = {}   # by value: equal frames share a location
    resolved_mappings: set[int] = set()

    def mapping_id(m: Mapping | None) -> int:
        if m is None:
            return 0
        mid = mapping_ids.get(m)
        if mid is None:
            mid = mapping_ids[m] = len(mapping_ids) + 1
            out.mapping.add(id=mid, memory_start=m.start, memory_limit=m.end,
                            file_offset=m.file_offset, filename=s(m.path), build_id=s(m.build_id))
        return mid

    def location_id(frame: Frame) -> int:
        lid = location_ids.get(frame)
        if lid is not None:
            return lid
        lid = location_ids[frame] = len(location_ids) + 1
        mid = mapping_id(frame_mapping(frame))
        loc = out.location.add(id=lid, mapping_id=mid, address=frame.address)
        if frame.function:
            fid = function_ids.get((frame.function, frame.file))
            if fid is None:
                fid = function_ids[(frame.function, frame.file)] = len(function_ids) + 1
                name = s(frame.function)
                out.function.add(id=fid, name=name, system_name=name, filename=s(frame.file))
            loc.line.add(function_id=fid, line=frame.line)
            if mid:
                resolved_mappings.add(mid)
        return lid

    labels_of: dict[tuple[int, int, str, str, str | None, tuple[tuple[str, str], ...]],
                    list[profile_pb2.Label]] = {}

    def labels(sample: StackSample) -> list[profile_pb2.Label]:
        """The sample's labels, built once per thread and goroutine label set (a drain has many
        samples of each). Goroutine labels keep their keys, as Go's own runtime/pprof writes them."""
        key = (sample.tid, sample.pid, sample.thread_name, sample.process_name, sample.container_id, sample.labels)
        got = labels_of.get(key)
        if got is None:
            got = labels_of[key] = [profile_pb2.Label(key=s(LABEL_TID), num=sample.tid),
                                    profile_pb2.Label(key=s(LABEL_PID), num=sample.pid)]
            for name, value in ((LABEL_THREAD_NAME, sample.thread_name),
                                (LABEL_PROCESS_NAME, sample.process_name),
                                (LABEL_CONTAINER_ID, sample.container_id)):
                if value:
                    got.append(profile_pb2.Label(key=s(name), str=s(value)))
            got.extend(profile_pb2.Label(key=s(k), str=s(v)) for k, v in sample.labels if k not in _OURS)
        if sample.link_span:
            trace = links.trace_of(sample.link_span)
            if trace is not None:
                got = [*got, profile_pb2.Label(key=s(LABEL_TRACE_ID), str=s(trace.hex())),
                       profile_pb2.Label(key=s(LABEL_SPAN_ID), str=s(sample.link_span.to_bytes(8, "little").hex()))]
        return got

    # ids start at 1: a miss is falsy
    known = location_ids.get
    for sample in profile.samples:
        out.sample.add(location_id=[known(f) or location_id(f) for f in sample.frames],
                       value=[sample.count] if off_cpu else [sample.count, sample.count * period],
                       label=labels(sample))
    for m in out.mapping:
        m.has_functions = m.id in resolved_mappings
    out.string_table.extend(table)
    return out


def from_pprof(pprof: profile_pb2.Profile) -> CpuProfile:
    """A pprof ``Profile`` (ours, or any CPU profile with a samples/count or cpu value) as a
    ``CpuProfile``; inlined lines become one frame each, innermost first."""
    strings = pprof.string_table
    mappings = {m.id: Mapping(m.memory_start, m.memory_limit, m.file_offset,
                              strings[m.filename], strings[m.build_id]) for m in pprof.mapping}
    functions = {f.id: (strings[f.name] or strings[f.system_name], strings[f.filename])
                 for f in pprof.function}
    locations: dict[int, list[Frame]] = {}
    for loc in pprof.location:
        mapping = mappings.get(loc.mapping_id)
        kind = "kernel" if mapping is not None and mapping.path.startswith("[kernel") else "native"
        if mapping == KERNEL_MAPPING:
            mapping = None
        lines = [(*functions.get(line.function_id, ("", "")), line.line) for line in loc.line] or [("", "", 0)]
        locations[loc.id] = [
            Frame(loc.address, name, "cpython" if mapping is None and kind == "native" and file
                  else kind, mapping, file, line) for name, file, line in lines]
    period = pprof.period or 1
    count_of = _sample_counter(pprof, period)
    off_cpu = [(pprof.string_table[t.type], pprof.string_table[t.unit]) for t in pprof.sample_type] == \
        [(OFF_CPU, "nanoseconds")]
    samples = []
    for sample in pprof.sample:
        labels = {strings[label.key]: (strings[label.str] if label.str else label.num)
                  for label in sample.label}
        frames = tuple(f for lid in sample.location_id for f in locations.get(lid, ()))
        samples.append(StackSample(
            frames=frames, count=count_of(sample), pid=int(labels.get(LABEL_PID, 0)),
            tid=int(labels.get(LABEL_TID, 0)), thread_name=str(labels.get(LABEL_THREAD_NAME, "")),
            process_name=str(labels.get(LABEL_PROCESS_NAME, "")),
            container_id=labels.get(LABEL_CONTAINER_ID) or None,
            link_span=int.from_bytes(bytes.fromhex(str(labels.get(LABEL_SPAN_ID, ""))), "little"),
            labels=tuple(sorted((k, v) for k, v in labels.items() if k not in _OURS and isinstance(v, str)))))
    if off_cpu:
        return CpuProfile(start_unix_nano=pprof.time_nanos, duration_ns=pprof.duration_nanos,
                          frequency_hz=1, samples=samples, sample_type=OFF_CPU)
    return CpuProfile(start_unix_nano=pprof.time_nanos, duration_ns=pprof.duration_nanos,
                      frequency_hz=max(1, round(1_000_000_000 / period)), samples=samples)


def _sample_counter(pprof: profile_pb2.Profile, period: int) -> Callable[[profile_pb2.Sample], int]:
    """How to read a sample's count: its samples/count value, else its cpu time ÷ period."""
    types = [(pprof.string_table[t.type], pprof.string_table[t.unit]) for t in pprof.sample_type]
    if ("samples", "count") in types:
        i = types.index(("samples", "count"))
        return lambda sample: sample.value[i]
    for i, (kind, _unit) in enumerate(types):
        if kind == "cpu":
            return lambda sample: round(sample.value[i] / period)
    return lambda sample: sample.value[0] if sample.value else 0


def write_pprof(profile: CpuProfile | profile_pb2.Profile, path: str | Path) -> None:
    """Writes gzip-compressed pprof (``.pb.gz``), as ``go tool pprof`` expects. At gzip's fastest
    level, as Go's runtime/pprof writes them: level 9 cost the agent several times the CPU for
    files a few percent smaller."""
    pprof = profile if isinstance(profile, profile_pb2.Profile) else to_pprof(profile)
    Path(path).write_bytes(gzip.compress(pprof.SerializeToString(), compresslevel=1))


def read_pprof(path: str | Path) -> profile_pb2.Profile:
    """Reads a pprof file, gzip-compressed or not."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return profile_pb2.Profile.FromString(data)
