"""The profile writers on a synthetic profile with resolved, unresolved and kernel frames in two
processes (one in a container): pprof read by ``go tool pprof``, OTLP Profiles checked against the
proto's dictionary rules and sent through the real Collector, folded stacks, the SVG flame graph."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from receiver.config import ExporterConfig
from receiver.convert.attributes import to_key_values
from receiver.convert.converter import EbpfOtlpConverter
from receiver.convert.profiles import BUILD_ID, profile_to_otlp
from receiver.export import OtlpGrpcExporter
from receiver.model import Signal
from receiver.profiling.model import OFF_CPU, CpuProfile, Frame, Mapping, StackSample
from receiver.profiling.output.flamegraph import to_folded, write_flamegraph_svg
from receiver.profiling.output.pprof import from_pprof, read_pprof, to_pprof, write_pprof
from receiver.telemetry import SelfTelemetry

from ..harness import Collector, attributes, fail_or_skip, wait_until

APP = Mapping(0x55550000, 0x55560000, 0x1000, "/usr/bin/app", "0badc0de" * 5)
LIBC = Mapping(0x7F0000000000, 0x7F0000200000, 0x28000, "/usr/lib/libc.so.6", "")
DB = Mapping(0x400000, 0x480000, 0, "/opt/db/bin/db", "feedface" * 5)
KERNEL = Mapping(0xFFFFFFFF81000000, 0xFFFFFFFF83000000, 0, "[kernel.kallsyms]")

START = Frame(0x55550100, "_start", "native", APP)
MAIN = Frame(0x55550200, "main", "native", APP)
BURN_A = Frame(0x55550300, "burn_a", "native", APP)
BURN_B = Frame(0x55550400, "burn_b", "native", APP)
LIBC_WRITE = Frame(0x7F0000001234, "", "native", LIBC)                 # unresolved
SYSCALL = Frame(0xFFFFFFFF81001000, "do_syscall_64", "kernel", None)   # kernel, no mapping
ENTRY = Frame(0xFFFFFFFF81002000, "entry_SYSCALL_64", "kernel", KERNEL)
DB_MAIN = Frame(0x401000, "main", "native", DB)                        # same name, other binary
DB_QUERY = Frame(0x402000, "run_query", "native", DB)
DB_UNKNOWN = Frame(0x403abc, "", "native", DB)                         # unresolved, with build id
CID = "ab" * 32
FREQ = 99


def _profile() -> CpuProfile:
    return CpuProfile(start_unix_nano=1_750_000_000_000_000_000, duration_ns=10_000_000_000,
                      frequency_hz=FREQ, samples=[
        _app((BURN_A, MAIN, START), 200, tid=101, thread_name="app"),
        _app((BURN_B, MAIN, START), 100, tid=102, thread_name="worker"),
        _app((SYSCALL, ENTRY, LIBC_WRITE, MAIN, START), 30, tid=101, thread_name="app"),
        _app((BURN_A, MAIN, START), 5, tid=101, thread_name="app"),     # same stack, same thread
        _db((DB_QUERY, DB_MAIN), 40, tid=200, thread_name="db"),
        _db((DB_UNKNOWN, DB_MAIN), 10, tid=201, thread_name="db-io"),
    ])


def _app(frames: tuple[Frame, ...], count: int, tid: int, thread_name: str) -> StackSample:
    return StackSample(frames, count, pid=100, tid=tid, thread_name=thread_name, process_name="app")


def _db(frames: tuple[Frame, ...], count: int, tid: int, thread_name: str) -> StackSample:
    return StackSample(frames, count, pid=200, tid=tid, thread_name=thread_name, process_name="db",
                       container_id=CID, cgroup_id=7)


def _frame_key(f: Frame) -> tuple[str, str]:
    return (f.function or f"0x{f.address:x}", f.frame_type)


def _model_counts(profile: CpuProfile) -> Counter[tuple[Any, ...]]:
    """Samples per (pid, tid, thread, process, container, frames) in the model."""
    out: Counter[tuple[Any, ...]] = Counter()
    for s in profile.samples:
        out[(s.pid, s.tid, s.thread_name, s.process_name, s.container_id,
             tuple(_frame_key(f) for f in s.frames))] += s.count
    return out


# --- pprof -----------------------------------------------------------------------------------

def test_pprof_round_trips_with_each_entry_once(tmp_path: Path) -> None:
    profile = _profile()
    path = tmp_path / "cpu.pb.gz"
    write_pprof(profile, path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    pprof = read_pprof(path)
    assert pprof == to_pprof(profile)
    strings = list(pprof.string_table)
    assert strings[0] == "" and len(set(strings)) == len(strings)
    assert [(strings[t.type], strings[t.unit]) for t in pprof.sample_type] == \
        [("samples", "count"), ("cpu", "nanoseconds")]
    assert (strings[pprof.period_type.type], pprof.period) == ("cpu", 1_000_000_000 // FREQ)
    assert sorted(strings[f.name] for f in pprof.function) == \
        ["_start", "burn_a", "burn_b", "do_syscall_64", "entry_SYSCALL_64", "main", "run_query"]
    assert len(pprof.location) == 10                       # one per distinct frame
    # The symbolizer's kernel mapping, and the catch-all one for kernel frames without a mapping.
    assert sorted(strings[m.filename] for m in pprof.mapping) == \
        ["/opt/db/bin/db", "/usr/bin/app", "/usr/lib/libc.so.6", "[kernel.kallsyms]",
         "[kernel.kallsyms]"]
    unresolved = [loc for loc in pprof.location if not loc.line]
    assert {loc.address for loc in unresolved} == {LIBC_WRITE.address, DB_UNKNOWN.address}
    assert all(loc.mapping_id for loc in pprof.location)   # kernel frames too: [kernel.kallsyms]
    builds = {strings[m.filename]: strings[m.build_id] for m in pprof.mapping}
    assert builds["/usr/bin/app"] == APP.build_id and builds["/opt/db/bin/db"] == DB.build_id
    assert list(pprof.sample[0].value) == [200, 200 * (1_000_000_000 // FREQ)]

    back = from_pprof(pprof)
    assert (back.start_unix_nano, back.duration_ns, back.frequency_hz) == \
        (profile.start_unix_nano, profile.duration_ns, FREQ)
    for got, want in zip(back.samples, profile.samples, strict=True):
        assert got.frames == want.frames            # address, function, type and mapping
        assert _identity(got) == _identity(want)


def _identity(s: StackSample) -> tuple[Any, ...]:
    return (s.count, s.pid, s.tid, s.thread_name, s.process_name, s.container_id)


def _go_pprof(tmp_path: Path, *args: str) -> str:
    if not shutil.which("go"):
        fail_or_skip("Go is not installed (make test installs it; go tool pprof reads our pprof)")
    env = {**os.environ, "HOME": os.environ.get("HOME") or str(tmp_path),
           "PPROF_TMPDIR": str(tmp_path)}
    r = subprocess.run(["go", "tool", "pprof", *args], capture_output=True, text=True, timeout=120,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_go_tool_pprof_names_the_functions_with_their_counts(tmp_path: Path) -> None:
    path = tmp_path / "cpu.pb.gz"
    write_pprof(_profile(), path)
    out = _go_pprof(tmp_path, "-top", "-sample_index=samples", "-symbolize=none", str(path))
    flat = {line.split()[-1]: int(line.split()[0]) for line in out.splitlines()
            if re.match(r"\s*\d+\s+[\d.]+%", line)}
    assert {name: n for name, n in flat.items() if n} == {
        "burn_a": 205, "burn_b": 100, "do_syscall_64": 30, "run_query": 40,
        "[db]": 10}, out  # pprof names an unresolved leaf after its mapping's file
    assert flat["main"] == 0 and flat["_start"] == 0, out
    assert "Total samples = 385" in out, out
    tags = _go_pprof(tmp_path, "-tags", "-sample_index=samples", "-symbolize=none", str(path))
    assert CID in tags and "worker" in tags and "run_query" not in tags, tags


# --- OTLP Profiles ---------------------------------------------------------------------------

TABLES = ("string_table", "mapping_table", "location_table", "function_table", "link_table",
          "attribute_table", "stack_table")


def _check_dictionary(req: ExportProfilesServiceRequest) -> None:
    """Index 0 null, every index in range, no duplicates, no orphans: the dictionary rules."""
    d = req.dictionary
    assert d.string_table[0] == ""
    for name in TABLES[1:]:
        table = getattr(d, name)
        assert table[0] == type(table[0])(), f"{name}[0] is not the zero value"
    for name in TABLES:
        entries = [e if isinstance(e, str) else e.SerializeToString(deterministic=True)
                   for e in getattr(d, name)]
        assert len(set(entries)) == len(entries), f"duplicates in {name}"

    used: dict[str, set[int]] = {name: {0} for name in TABLES}

    def ref(table: str, *indices: int) -> None:
        for i in indices:
            assert 0 <= i < len(getattr(d, table)), f"{table} index {i} out of range"
            used[table].add(i)

    for m in d.mapping_table:
        ref("string_table", m.filename_strindex)
        ref("attribute_table", *m.attribute_indices)
    for loc in d.location_table:
        ref("mapping_table", loc.mapping_index)
        ref("attribute_table", *loc.attribute_indices)
        ref("function_table", *(line.function_index for line in loc.lines))
    for f in d.function_table:
        ref("string_table", f.name_strindex, f.system_name_strindex, f.filename_strindex)
    for a in d.attribute_table:
        ref("string_table", a.key_strindex, a.unit_strindex)
    for st in d.stack_table:
        ref("location_table", *st.location_indices)
    for rp in req.resource_profiles:
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                ref("string_table", p.sample_type.type_strindex, p.sample_type.unit_strindex,
                    p.period_type.type_strindex, p.period_type.unit_strindex)
                ref("attribute_table", *p.attribute_indices)
                for s in p.samples:
                    ref("stack_table", s.stack_index)
                    ref("attribute_table", *s.attribute_indices)
                    ref("link_table", s.link_index)
                    keys = [d.attribute_table[i].key_strindex for i in s.attribute_indices]
                    assert len(set(keys)) == len(keys), "a sample repeats an attribute key"
    for name in TABLES:
        assert used[name] == set(range(len(getattr(d, name)))), f"orphans in {name}"


def _attrs(d: pb.ProfilesDictionary, indices: Any) -> dict[str, Any]:
    out = {}
    for i in indices:
        a = d.attribute_table[i]
        out[d.string_table[a.key_strindex]] = getattr(a.value, a.value.WhichOneof("value"))
    return out


def _resource_attrs(rp: pb.ResourceProfiles) -> dict[str, Any]:
    return attributes(json_format.MessageToDict(rp.resource).get("attributes"))


def _name(d: pb.ProfilesDictionary, loc: pb.Location) -> str:
    """The location's function name, or its address when unresolved."""
    if not loc.lines:
        return f"0x{loc.address:x}"
    return d.string_table[d.function_table[loc.lines[0].function_index].name_strindex]


def _otlp_counts(req: ExportProfilesServiceRequest, sample_type: str = "samples") -> Counter[tuple[Any, ...]]:
    """Samples (or off_cpu nanoseconds) per (pid, tid, thread, process, container, frames) in an
    OTLP request's profiles of that sample type."""
    d = req.dictionary
    out: Counter[tuple[Any, ...]] = Counter()
    for rp in req.resource_profiles:
        resource_pid = _resource_attrs(rp)["process.pid"]
        for p in rp.scope_profiles[0].profiles:
            if d.string_table[p.sample_type.type_strindex] != sample_type:
                continue
            for s in p.samples:
                attrs = _attrs(d, s.attribute_indices)
                assert attrs["process.pid"] == resource_pid
                frames = []
                for li in d.stack_table[s.stack_index].location_indices:
                    loc = d.location_table[li]
                    frame_type = _attrs(d, loc.attribute_indices)["profile.frame.type"]
                    frames.append((_name(d, loc), frame_type))
                out[(attrs["process.pid"], attrs["thread.id"], attrs.get("thread.name", ""),
                     attrs.get("process.executable.name", ""), attrs.get("container.id"),
                     tuple(frames))] += s.values[0]
    return out


def _value_type(strings: list[str], vt: pb.ValueType) -> tuple[str, str]:
    return strings[vt.type_strindex], strings[vt.unit_strindex]


def test_otlp_request_follows_the_dictionary_rules_and_keeps_every_count() -> None:
    profile = _profile()
    req = profile_to_otlp(profile)
    _check_dictionary(req)
    d, strings = req.dictionary, list(req.dictionary.string_table)
    assert _otlp_counts(req) == _model_counts(profile)

    assert len(req.resource_profiles) == 2           # one per process
    ids = set()
    for rp in req.resource_profiles:
        (prof,) = rp.scope_profiles[0].profiles
        assert rp.scope_profiles[0].scope.name == "ebpf-otlp-receiver"
        assert _value_type(strings, prof.sample_type) == ("samples", "count")
        assert _value_type(strings, prof.period_type) == ("cpu", "nanoseconds")
        assert prof.period == 1_000_000_000 // FREQ
        assert prof.time_unix_nano == profile.start_unix_nano
        assert prof.duration_nano == profile.duration_ns
        assert len(prof.profile_id) == 16 and any(prof.profile_id)
        ids.add(prof.profile_id)
        stacks = [(s.stack_index, tuple(sorted(s.attribute_indices))) for s in prof.samples]
        assert len(set(stacks)) == len(stacks)       # same identity → one sample (200 + 5)
    assert len(ids) == 2
    resources = [_resource_attrs(rp) for rp in req.resource_profiles]
    assert resources == [{"process.pid": 100, "process.executable.name": "app"},
                         {"process.pid": 200, "process.executable.name": "db", "container.id": CID}]

    by_address = {loc.address: loc for loc in d.location_table[1:]}
    unresolved = by_address[LIBC_WRITE.address]
    assert not unresolved.lines
    assert strings[d.mapping_table[unresolved.mapping_index].filename_strindex] == LIBC.path
    db_unknown = d.mapping_table[by_address[DB_UNKNOWN.address].mapping_index]
    assert (db_unknown.memory_start, db_unknown.memory_limit) == (DB.start, DB.end)
    assert _attrs(d, db_unknown.attribute_indices) == {BUILD_ID: DB.build_id}
    libc = d.mapping_table[unresolved.mapping_index]
    assert libc.file_offset == LIBC.file_offset and _attrs(d, libc.attribute_indices) == {}
    kernel = by_address[SYSCALL.address]
    assert _attrs(d, kernel.attribute_indices) == {"profile.frame.type": "kernel"}
    assert strings[d.mapping_table[kernel.mapping_index].filename_strindex] == "[kernel.kallsyms]"
    assert _attrs(d, by_address[BURN_A.address].attribute_indices) == \
        {"profile.frame.type": "native"}
    # "main" in two binaries: one function, two locations.
    assert [strings[f.name_strindex] for f in d.function_table].count("main") == 1
    assert len([loc for loc in d.location_table if _name(d, loc) == "main"]) == 2


def test_resource_for_supplies_the_callers_resource() -> None:
    host = Resource(attributes=to_key_values({"host.name": "node-1", "process.pid": 100}))
    req = profile_to_otlp(_profile(), resource_for=lambda pid: host if pid == 100 else None)
    assert req.resource_profiles[0].resource == host
    assert _resource_attrs(req.resource_profiles[1]) == \
        {"process.pid": 200, "process.executable.name": "db", "container.id": CID}


def test_pprof_profile_converts_to_the_same_otlp() -> None:
    profile = _profile()
    via_pprof = EbpfOtlpConverter().convert_profile_to_otlp(to_pprof(profile))
    _check_dictionary(via_pprof)
    assert _otlp_counts(via_pprof) == _model_counts(profile)
    assert _otlp_counts(profile_to_otlp(profile)) == _model_counts(profile)
    (prof,) = via_pprof.resource_profiles[0].scope_profiles[0].profiles
    assert prof.period == 1_000_000_000 // FREQ


# --- folded stacks and flame graph -----------------------------------------------------------

def test_folded_stacks_are_exact() -> None:
    assert to_folded(_profile()) == (
        "app;_start;main;burn_a 205\n"
        "app;_start;main;burn_b 100\n"
        "app;_start;main;libc.so.6+0x29234;entry_SYSCALL_64_[k];do_syscall_64_[k] 30\n"
        "db;main;db+0x3abc 10\n"
        "db;main;run_query 40\n")


def test_flamegraph_svg_draws_frames_by_width(tmp_path: Path) -> None:
    path = tmp_path / "cpu.svg"
    write_flamegraph_svg(_profile(), path, title="cpu <test>")
    root = ET.parse(path).getroot()
    ns = {"svg": "http://www.w3.org/2000/svg"}
    frames = {}
    for g in root.iterfind("svg:g", ns):
        title = g.find("svg:title", ns).text
        rect = g.find("svg:rect", ns)
        frames[title] = (float(rect.get("x")), float(rect.get("y")), float(rect.get("width")),
                         rect.get("fill"), g.find("svg:text", ns).text or "")
    assert "all (385 samples, 100.00%)" in frames
    a = frames["burn_a (205 samples, 53.25%)"]
    b = frames["burn_b (100 samples, 25.97%)"]
    main = frames["main (335 samples, 87.01%)"]
    assert a[2] / b[2] == pytest.approx(205 / 100, rel=1e-3)
    assert a[1] == b[1] == main[1] - 16                 # siblings one level above their parent
    assert main[0] <= a[0] and a[0] + a[2] <= b[0] + 0.01          # side by side within main
    assert b[0] + b[2] <= main[0] + main[2] + 0.01
    assert a[4] == "burn_a"
    kernel = frames["do_syscall_64 (30 samples, 7.79%)"]
    assert kernel[3] != a[3] and _is_blueish(kernel[3]) and not _is_blueish(a[3])
    assert root.find("svg:text", ns).text == "cpu <test>"


def _is_blueish(fill: str) -> bool:
    r, _g, b = (int(v) for v in re.findall(r"\d+", fill))
    return b > r


# --- the real Collector ----------------------------------------------------------------------

@pytest.mark.collector
def test_collector_receives_the_profile(collector: Collector) -> None:
    profile = _profile()
    telemetry = SelfTelemetry()

    async def main() -> None:
        config = ExporterConfig(endpoint=collector.endpoint, batch_timeout=0.05)
        exporter = OtlpGrpcExporter(config, telemetry)
        await exporter.start()
        assert exporter.submit(Signal.PROFILES, None, profile_to_otlp(profile))
        await exporter.flush()
        await exporter.shutdown()

    asyncio.run(main())
    (written,) = wait_until(lambda: collector.requests("profiles"), 10,
                            what="profiles in the file output")
    strings = written["dictionary"]["stringTable"]
    for rp in written["resourceProfiles"]:
        _resolve_strindexes(rp["resource"].get("attributes", []), strings)
        for sp in rp["scopeProfiles"]:
            for p in sp["profiles"]:                   # OTLP/JSON ids are hex, not base64
                assert len(bytes.fromhex(p.pop("profileId"))) == 16
    back = json_format.ParseDict(written, ExportProfilesServiceRequest())
    assert back.dictionary.string_table[0] == "" and len(strings) == len(set(strings))
    assert _otlp_counts(back) == _model_counts(profile)
    assert [_resource_attrs(rp)["process.pid"] for rp in back.resource_profiles] == [100, 200]
    builds = {_attrs(back.dictionary, m.attribute_indices).get(BUILD_ID)
              for m in back.dictionary.mapping_table}
    assert builds == {None, APP.build_id, DB.build_id}


def _resolve_strindexes(kvs: list[dict[str, Any]], strings: list[str]) -> None:
    """The Collector writes resource attributes through the string table (``keyStrindex``,
    ``stringValueStrindex``, newer than proto 1.10): back to plain ``key``/``stringValue``."""
    for kv in kvs:
        if "keyStrindex" in kv:
            kv["key"] = strings[kv.pop("keyStrindex")]
        value = kv.get("value", {})
        if "stringValueStrindex" in value:
            value["stringValue"] = strings[value.pop("stringValueStrindex")]


# --- off-CPU time ------------------------------------------------------------------------------

FUTEX = Frame(0xFFFFFFFF81003000, "futex_wait", "kernel", KERNEL)
SCHEDULE = Frame(0xFFFFFFFF81004000, "schedule", "kernel", KERNEL)
WAIT = Frame(0x55550500, "wait_for_lock", "native", APP)


def _off_cpu() -> CpuProfile:
    """Nanoseconds off the CPU: app waits 1.5 s on a lock in two threads, db 0.25 s."""
    return CpuProfile(start_unix_nano=1_750_000_000_000_000_000, duration_ns=10_000_000_000, frequency_hz=FREQ,
                      sample_type=OFF_CPU, blocks=30, samples=[
        _app((SCHEDULE, FUTEX, WAIT, MAIN, START), 1_000_000_000, tid=101, thread_name="app"),
        _app((SCHEDULE, FUTEX, WAIT, MAIN, START), 500_000_000, tid=102, thread_name="worker"),
        _db((SCHEDULE, FUTEX, DB_QUERY, DB_MAIN), 250_000_000, tid=200, thread_name="db"),
    ])


def test_off_cpu_pprof_is_off_cpu_nanoseconds_and_round_trips(tmp_path: Path) -> None:
    off = _off_cpu()
    pprof = to_pprof(off)
    strings = list(pprof.string_table)
    assert [(strings[t.type], strings[t.unit]) for t in pprof.sample_type] == [("off_cpu", "nanoseconds")]
    assert (strings[pprof.period_type.type], strings[pprof.period_type.unit], pprof.period) == \
        ("off_cpu", "nanoseconds", 1)
    assert sorted(v for s in pprof.sample for v in s.value) == [250_000_000, 500_000_000, 1_000_000_000]
    path = tmp_path / "offcpu.pb.gz"
    write_pprof(off, path)
    back = from_pprof(read_pprof(path))
    assert back.sample_type == OFF_CPU and _model_counts(back) == _model_counts(off)


def test_go_tool_pprof_reads_off_cpu_time(tmp_path: Path) -> None:
    path = tmp_path / "offcpu.pb.gz"
    write_pprof(_off_cpu(), path)
    out = _go_pprof(tmp_path, "-top", "-cum", "-sample_index=off_cpu", "-unit=ms", "-symbolize=none", str(path))
    rows = (re.match(r"\s*\S+\s+[\d.]+%\s+[\d.]+%\s+([\d.]+)ms\s+[\d.]+%\s+(\S+)$", line)
            for line in out.splitlines())
    cum = {m[2]: float(m[1]) for m in rows if m}
    assert cum["wait_for_lock"] == 1500 and cum["run_query"] == 250 and cum["schedule"] == 1750, out


def test_otlp_off_cpu_profile_beside_the_cpu_profile() -> None:
    cpu = _profile()
    cpu.off_cpu = _off_cpu()
    req = profile_to_otlp(cpu)
    _check_dictionary(req)                       # one dictionary for both
    strings = list(req.dictionary.string_table)
    assert _otlp_counts(req) == _model_counts(cpu)
    assert _otlp_counts(req, "off_cpu") == _model_counts(cpu.off_cpu)
    assert len(req.resource_profiles) == 2       # the same resources: one per process
    for rp in req.resource_profiles:
        cpu_p, off_p = rp.scope_profiles[0].profiles
        assert _value_type(strings, cpu_p.sample_type) == ("samples", "count")
        assert _value_type(strings, off_p.sample_type) == ("off_cpu", "nanoseconds")
        assert _value_type(strings, off_p.period_type) == ("off_cpu", "nanoseconds") and off_p.period == 1
        assert off_p.time_unix_nano == cpu_p.time_unix_nano and off_p.duration_nano == cpu_p.duration_nano
    # the off-CPU stacks share the CPU profile's locations: main of app is one location
    d = req.dictionary
    assert len([loc for loc in d.location_table if _name(d, loc) == "main"]) == 2


def test_off_cpu_split_by_process_keeps_both_profiles() -> None:
    from receiver.convert.profiles import profile_requests

    cpu = _profile()
    cpu.off_cpu = _off_cpu()
    parts = profile_requests(cpu, None, max_bytes=1)   # too small for anything: split per process
    assert len(parts) == 2
    total: Counter[tuple[Any, ...]] = Counter()
    for part in parts:
        total += _otlp_counts(part, "off_cpu")
    assert total == _model_counts(cpu.off_cpu)


def test_off_cpu_flamegraph_width_is_time(tmp_path: Path) -> None:
    folded = to_folded(_off_cpu())
    assert "app;_start;main;wait_for_lock;futex_wait_[k];schedule_[k] 1500000000" in folded, folded
    write_flamegraph_svg(_off_cpu(), tmp_path / "offcpu.svg", title="Off-CPU")
    ET.parse(tmp_path / "offcpu.svg")


def test_collector_receives_the_off_cpu_profile(collector: Collector) -> None:
    cpu = _profile()
    cpu.off_cpu = _off_cpu()
    telemetry = SelfTelemetry()

    async def main() -> None:
        config = ExporterConfig(endpoint=collector.endpoint, batch_timeout=0.05)
        exporter = OtlpGrpcExporter(config, telemetry)
        await exporter.start()
        assert exporter.submit(Signal.PROFILES, None, profile_to_otlp(cpu))
        await exporter.flush()
        await exporter.shutdown()

    asyncio.run(main())
    (written,) = wait_until(lambda: collector.requests("profiles"), 10, what="profiles in the file output")
    strings = written["dictionary"]["stringTable"]
    for rp in written["resourceProfiles"]:
        _resolve_strindexes(rp["resource"].get("attributes", []), strings)
        for sp in rp["scopeProfiles"]:
            for p in sp["profiles"]:
                p.pop("profileId")
    back = json_format.ParseDict(written, ExportProfilesServiceRequest())
    assert _otlp_counts(back, "off_cpu") == _model_counts(cpu.off_cpu)
    assert _otlp_counts(back) == _model_counts(cpu)
