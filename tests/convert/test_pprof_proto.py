"""protos/profile.proto is pprof's format: a profile written with it is read by `go tool pprof`,
and the checked-in generated module matches the .proto."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from receiver.proto import profile_pb2

from ..harness import REPO, fail_or_skip


def _profile() -> profile_pb2.Profile:
    strings = ["", "samples", "count", "cpu", "nanoseconds", "burn_a", "burn_b", "/bin/app"]
    p = profile_pb2.Profile(string_table=strings, period=10_101_010,
                            period_type=profile_pb2.ValueType(type=3, unit=4))
    p.sample_type.add(type=1, unit=2)
    p.sample_type.add(type=3, unit=4)
    p.mapping.add(id=1, memory_start=0x400000, memory_limit=0x500000, filename=7, has_functions=True)
    p.function.add(id=1, name=5, system_name=5)
    p.function.add(id=2, name=6, system_name=6)
    loc_a = p.location.add(id=1, mapping_id=1, address=0x401000)
    loc_a.line.add(function_id=1)
    loc_b = p.location.add(id=2, mapping_id=1, address=0x402000)
    loc_b.line.add(function_id=2)
    p.sample.add(location_id=[1], value=[200, 200 * 10_101_010])
    p.sample.add(location_id=[2], value=[100, 100 * 10_101_010])
    return p


def test_go_tool_pprof_reads_it(tmp_path: Path) -> None:
    if not shutil.which("go"):
        fail_or_skip("Go is not installed (make test installs it; go tool pprof reads our pprof)")
    path = tmp_path / "cpu.pb.gz"
    path.write_bytes(gzip.compress(_profile().SerializeToString()))
    r = subprocess.run(["go", "tool", "pprof", "-top", "-sample_index=samples", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[-1]: line.split() for line in r.stdout.splitlines()
             if line.strip().endswith(("burn_a", "burn_b"))}
    assert lines["burn_a"][0] == "200" and lines["burn_b"][0] == "100", r.stdout


def test_generated_module_matches_the_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    assert protoc.main(["protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}",
                        str(REPO / "protos/profile.proto")]) == 0
    fresh = (tmp_path / "profile_pb2.py").read_text()
    checked_in = (REPO / "receiver/proto/profile_pb2.py").read_text()
    def strip(s: str) -> list[str]:
        return [ln for ln in s.splitlines() if "Protobuf Python Version" not in ln and "_runtime_version" not in ln]

    assert strip(fresh) == strip(checked_in), "run `make proto`"
