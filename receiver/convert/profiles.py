"""CPU profile → OTLP Profiles (``opentelemetry.proto.profiles.v1development``, proto 1.10).

One ``ProfilesDictionary`` per request holds every string, function, location, mapping, stack and
attribute once; entry 0 of each table is the required null entry. Sample type and period are
what the OpenTelemetry eBPF profiler reports (``samples/count``, period ``cpu/nanoseconds`` of
1e9 / frequency), so backends that read its profiles read ours. There is one ``ResourceProfiles``
per process; each sample carries ``thread.id``, ``thread.name``, ``process.pid``,
``process.executable.name`` and ``container.id`` (where known) as the eBPF profiler's do. Locations
carry ``profile.frame.type``; mappings carry ``process.executable.build_id.gnu`` (and a Go
binary's ``process.executable.build_id.go``). An unresolved
frame is a location with its address and mapping and no line, for the backend to symbolize.
A Python frame (``cpython``) is a location without mapping whose line names the function (its
qualified name and file) and the line number.

A profile carrying off-CPU time (``CpuProfile.off_cpu``) adds, in each process's scope, a second
``Profile`` with sample type and period ``off_cpu/nanoseconds`` (period 1): same resource, same
dictionary, same frame types; each value is the estimated nanoseconds off the CPU.

A sample taken while its thread served an HTTP request (``StackSample.link_span``, request links:
receiver/profiling/links.py) references a ``link_table`` entry (trace id, span id of the request's
SERVER span) by ``link_index``.

A Go sample's goroutine labels (``StackSample.labels``, receiver/profiling/runtimes/go.py) are
sample attributes ``process.context.label.<key>``, as the OpenTelemetry eBPF profiler names them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .._version import __version__
from ..profiling import links
from ..profiling.model import OFF_CPU, CpuProfile, Frame, Mapping, StackSample
from ..profiling.output.pprof import frame_mapping, from_pprof
from ..profiling.runtimes.go import LABEL_ATTRIBUTE_PREFIX
from ..proto import profile_pb2
from .attributes import to_key_values

__all__ = ["profile_to_otlp", "profile_requests", "ProfilesDictionaryBuilder", "SCOPE"]

SCOPE = InstrumentationScope(name="ebpf-otlp-receiver", version=__version__)

ResourceFor = Callable[[int], Resource | None]
BUILD_ID = "process.executable.build_id.gnu"
GO_BUILD_ID = "process.executable.build_id.go"


class ProfilesDictionaryBuilder:
    """Builds one ``ProfilesDictionary``: each table deduplicated by value, index 0 null."""

    def __init__(self, dictionary: pb.ProfilesDictionary | None = None) -> None:
        """Fills ``dictionary`` (an empty one, e.g. a request's) or a new one."""
        self.dictionary = d = dictionary if dictionary is not None else pb.ProfilesDictionary()
        d.string_table.append("")
        for table in (d.mapping_table, d.location_table, d.function_table, d.link_table,
                      d.attribute_table, d.stack_table):
            table.add()
        self._strings: dict[str, int] = {"": 0}
        self._attributes: dict[tuple[str, str | int], int] = {}
        self._mappings: dict[Mapping, int] = {}
        self._functions: dict[tuple[str, str], int] = {}
        self._locations: dict[tuple[int, int, int, str, int], int] = {}
        self._frames: dict[Frame, int] = {}     # fast path: a frame already seen
        self._stacks: dict[tuple[int, ...], int] = {(): 0}
        self._sample_attributes: dict[tuple[int, str, int, str, str | None, tuple[tuple[str, str], ...]],
                                      tuple[int, ...]] = {}
        self._links: dict[int, int] = {0: 0}

    def link(self, span: int) -> int:
        """The link_table index of the request with this kernel span id (request links): its
        trace id from the http source's registry; 0 (no link) when the registry has none, which
        ``links.unresolved`` counts."""
        i = self._links.get(span)
        if i is None:
            trace = links.trace_of(span)
            if trace is None:
                links.count_unresolved()
                i = 0
            else:
                i = len(self.dictionary.link_table)
                self.dictionary.link_table.add(trace_id=trace, span_id=span.to_bytes(8, "little"))
            self._links[span] = i
        return i

    def string(self, s: str) -> int:
        i = self._strings.get(s)
        if i is None:
            i = self._strings[s] = len(self.dictionary.string_table)
            self.dictionary.string_table.append(s)
        return i

    def attribute(self, key: str, value: str | int) -> int:
        i = self._attributes.get((key, value))
        if i is None:
            i = self._attributes[(key, value)] = len(self.dictionary.attribute_table)
            any_value = (AnyValue(int_value=value) if isinstance(value, int)
                         else AnyValue(string_value=value))
            self.dictionary.attribute_table.add(key_strindex=self.string(key), value=any_value)
        return i

    def mapping(self, m: Mapping | None) -> int:
        if m is None:
            return 0
        i = self._mappings.get(m)
        if i is None:
            i = self._mappings[m] = len(self.dictionary.mapping_table)
            attrs = [self.attribute(BUILD_ID, m.build_id)] if m.build_id else []
            if m.go_build_id:
                attrs.append(self.attribute(GO_BUILD_ID, m.go_build_id))
            self.dictionary.mapping_table.add(
                memory_start=m.start, memory_limit=m.end, file_offset=m.file_offset,
                filename_strindex=self.string(m.path), attribute_indices=attrs)
        return i

    def function(self, name: str, filename: str = "") -> int:
        i = self._functions.get((name, filename))
        if i is None:
            i = self._functions[(name, filename)] = len(self.dictionary.function_table)
            s = self.string(name)
            self.dictionary.function_table.add(name_strindex=s, system_name_strindex=s,
                                               filename_strindex=self.string(filename))
        return i

    def location(self, frame: Frame) -> int:
        i = self._frames.get(frame)
        if i is not None:
            return i
        key = (self.mapping(frame_mapping(frame)), frame.address,
               self.function(frame.function, frame.file) if frame.function else 0, frame.frame_type,
               frame.line)
        i = self._locations.get(key)
        if i is None:
            i = self._locations[key] = len(self.dictionary.location_table)
            mapping_index, address, function_index, frame_type, line = key
            loc = self.dictionary.location_table.add(
                mapping_index=mapping_index, address=address,
                attribute_indices=[self.attribute("profile.frame.type", frame_type)])
            if function_index:
                loc.lines.add(function_index=function_index, line=line)
        self._frames[frame] = i
        return i

    def stack(self, frames: Iterable[Frame]) -> int:
        # Location indices start at 1 (0 is the null entry), so a miss in the fast path is falsy.
        known = self._frames.get
        location = self.location
        key = tuple([known(f) or location(f) for f in frames])
        i = self._stacks.get(key)
        if i is None:
            i = self._stacks[key] = len(self.dictionary.stack_table)
            self.dictionary.stack_table.add(location_indices=key)
        return i

    def sample_attributes(self, sample: StackSample) -> tuple[int, ...]:
        """thread.id, thread.name, process.pid, process.executable.name, container.id, and a Go
        sample's goroutine labels as process.context.label.<key> (built once per thread and label
        set: a drain has many samples of each)."""
        key = (sample.tid, sample.thread_name, sample.pid, sample.process_name, sample.container_id, sample.labels)
        attrs = self._sample_attributes.get(key)
        if attrs is None:
            attrs = self._sample_attributes[key] = self._build_sample_attributes(sample)
        return attrs

    def _build_sample_attributes(self, sample: StackSample) -> tuple[int, ...]:
        attrs = [self.attribute("thread.id", sample.tid)]
        if sample.thread_name:
            attrs.append(self.attribute("thread.name", sample.thread_name))
        attrs.append(self.attribute("process.pid", sample.pid))
        if sample.process_name:
            attrs.append(self.attribute("process.executable.name", sample.process_name))
        if sample.container_id:
            attrs.append(self.attribute("container.id", sample.container_id))
        for key, value in sample.labels:   # goroutine labels, named as the OTel eBPF profiler names them
            attrs.append(self.attribute(LABEL_ATTRIBUTE_PREFIX + key, value))
        return tuple(attrs)


def _process_resource(sample: StackSample) -> Resource:
    return Resource(attributes=to_key_values({
        "process.pid": sample.pid, "process.executable.name": sample.process_name or None,
        "container.id": sample.container_id}))


def profile_to_otlp(profile: CpuProfile | profile_pb2.Profile,
                    resource_for: ResourceFor | None = None) -> ExportProfilesServiceRequest:
    """One request for the whole profile: a ``ResourceProfiles`` per process (its resource from
    ``resource_for(pid)`` when that returns one, else process.pid/executable name/container.id),
    each with one ``Profile`` whose samples sum the model's counts per stack and attributes."""
    if isinstance(profile, profile_pb2.Profile):
        profile = from_pprof(profile)
    request = ExportProfilesServiceRequest()
    builder = ProfilesDictionaryBuilder(request.dictionary)
    parts = [p for p in (profile, profile.off_cpu) if p is not None]
    by_process: dict[int, StackSample] = {}
    counted = [_count_by_process(builder, p, by_process) for p in parts]
    for pid, first in by_process.items():
        resource = (resource_for(pid) if resource_for else None) or _process_resource(first)
        profiles = [_otlp_profile(builder, part, counts[pid]) for part, counts in zip(parts, counted)
                    if pid in counts]
        request.resource_profiles.add(resource=resource).scope_profiles.add(scope=SCOPE, profiles=profiles)
    return request


def _count_by_process(builder: ProfilesDictionaryBuilder, profile: CpuProfile, first_of: dict[int, StackSample],
                      ) -> dict[int, dict[tuple[int, tuple[int, ...], int], int]]:
    """The profile's counts per process, by (stack, attributes, link); notes each process's first sample."""
    by_process: dict[int, dict[tuple[int, tuple[int, ...], int], int]] = {}
    stack, attributes, link = builder.stack, builder.sample_attributes, builder.link
    for sample in profile.samples:
        counts = by_process.get(sample.pid)
        if counts is None:
            counts = by_process[sample.pid] = {}
            first_of.setdefault(sample.pid, sample)
        key = (stack(sample.frames), attributes(sample), link(sample.link_span) if sample.link_span else 0)
        counts[key] = counts.get(key, 0) + sample.count
    return by_process


def _otlp_profile(builder: ProfilesDictionaryBuilder, profile: CpuProfile,
                  counts: dict[tuple[int, tuple[int, ...], int], int]) -> pb.Profile:
    """One process's ``Profile``: samples/count with period cpu/nanoseconds, or for an off-CPU
    profile off_cpu/nanoseconds (each value the estimated nanoseconds off the CPU)."""
    if profile.sample_type == OFF_CPU:
        sample_type = pb.ValueType(type_strindex=builder.string(OFF_CPU), unit_strindex=builder.string("nanoseconds"))
        period_type = sample_type
    else:
        sample_type = pb.ValueType(type_strindex=builder.string("samples"), unit_strindex=builder.string("count"))
        period_type = pb.ValueType(type_strindex=builder.string("cpu"), unit_strindex=builder.string("nanoseconds"))
    otlp = pb.Profile(sample_type=sample_type, period_type=period_type,
                      period=profile.period_ns, time_unix_nano=profile.start_unix_nano,
                      duration_nano=profile.duration_ns, profile_id=os.urandom(16))
    add = otlp.samples.add    # in place: extend() with new Samples built each one twice
    for (stack, attrs, link), count in counts.items():
        add(stack_index=stack, attribute_indices=attrs, link_index=link, values=[count])
    return otlp


def profile_requests(profile: CpuProfile, resource_for: ResourceFor | None,
                     max_bytes: int) -> list[ExportProfilesServiceRequest]:
    """The profile as requests of at most ``max_bytes``, split by process while one is over. Each
    part is built with its own dictionary of only what its processes use; the exporter's generic
    ``split_request`` could only copy the whole dictionary into every part, which a host with
    many processes never gets under the limit. A single process too large on its own still goes
    as one request, for the exporter to split further or count as ``too_large``."""
    request = profile_to_otlp(profile, resource_for)
    by_pid: dict[int, list[StackSample]] = {}
    for sample in profile.samples:
        by_pid.setdefault(sample.pid, []).append(sample)
    off_by_pid: dict[int, list[StackSample]] = {}
    for sample in profile.off_cpu.samples if profile.off_cpu is not None else ():
        off_by_pid.setdefault(sample.pid, []).append(sample)
        by_pid.setdefault(sample.pid, [])
    if request.ByteSize() <= max_bytes or len(by_pid) < 2:
        return [request]
    pids = sorted(by_pid)
    out = []
    for half in (pids[: len(pids) // 2], pids[len(pids) // 2:]):
        part = CpuProfile(profile.start_unix_nano, profile.duration_ns, profile.frequency_hz,
                          [s for pid in half for s in by_pid[pid]])
        if profile.off_cpu is not None:
            off = profile.off_cpu
            part.off_cpu = CpuProfile(off.start_unix_nano, off.duration_ns, off.frequency_hz,
                                      [s for pid in half for s in off_by_pid.get(pid, ())],
                                      sample_type=OFF_CPU, blocks=off.blocks)
        out.extend(profile_requests(part, resource_for, max_bytes))
    return out
