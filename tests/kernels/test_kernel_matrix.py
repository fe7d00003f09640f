"""The kernel matrix: the agent's smoke suite on Debian's 5.10, 6.1 and 6.12 kernels under qemu
(``tests/kernels/vm.py`` builds the guest image, ``guest_suite.py`` runs inside each guest).

One table per run, kernel × source → ok / degraded (reason) / failed. A source is degraded
when the kernel lacks a feature it uses and it runs a fallback (its exact tests still pass) or
is disabled for that missing feature; anything else that does not pass is a failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ..harness import REPO, fail_or_skip
from . import vm
from .guest_suite import SOURCES, smoke_tests

pytestmark = [pytest.mark.kernels]

# Guests run in lanes (tests/kernels/vm.py), newest kernel first, each guest on one vCPU under
# TCG: the background lane the session started (tests/conftest.py) plus this test's own, JOBS
# lanes in all. Two at a time on two cores give each guest a whole core, as the guests' own
# timeouts assume (three at a time stretched the 6.12 guest's profiler compile to 1116 s and its
# agent missed its ready timeout).
JOBS = int(os.environ.get("KERNEL_MATRIX_JOBS", "2"))
VM_TIMEOUT = vm.VM_TIMEOUT


def _junit(path: Path) -> dict[str, tuple[str, str]]:
    """node id → (outcome, message) from the guest's pytest."""
    if not path.exists():
        return {}
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        mod = case.get("classname", "").replace(".", "/") + ".py"
        nid = f"{mod}::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                msg = (el.get("message") or el.text or "").strip().splitlines()[0][:200] if (
                    el.get("message") or el.text) else tag
                break
        out[nid] = (outcome, msg)
    return out


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell(source: str, res: vm.VmResult) -> tuple[str, str]:
    """(status, reason) of one source on one kernel, from what the guest wrote."""
    from receiver.kernel import features as kernel_features

    out = res.out
    if res.returncode is None:
        return "failed", f"guest hung (killed after {VM_TIMEOUT:.0f}s)"
    info, every = _load(out / "info.json"), _load(out / "all.json")
    if info is None or not (out / "done").exists():
        return "failed", "the guest suite did not finish (see serial.log)"
    if not every or every.get("returncode") != 0:
        code = every.get("returncode") if every else None
        return "failed", f"agent with all sources: exit {code} {(every or {}).get('error', '')[:150]}"
    feats = kernel_features.KernelFeatures(**info["features"])
    missing = kernel_features.degradations(source, feats)
    results = _junit(out / "junit.xml")
    tests = [results.get(t, ("missing", "not run")) for t in smoke_tests(source, feats)]
    up = every.get("up", {}).get(source, False)
    disabled = every.get("disabled", {}).get(source)
    lacks = "; ".join(f"no {f.tracepoint or f.name}, kernel < {f.since}" for f in missing)
    if up and all(o == "passed" for o, _ in tests):
        notes = [f"fallback: {lacks}"] if missing else []
        off_cpu = every.get("off_cpu", "ok") if source == "profiler" else "ok"
        if off_cpu != "ok":            # the profiler ran with off_cpu on; it turned that part off
            notes.append(f"off-CPU {off_cpu}")
        return ("degraded", "; ".join(notes)) if notes else ("ok", "")
    if not up and disabled and any(f.disables and f.name in disabled for f in missing):
        return "degraded", f"disabled: {lacks}"
    bad = [m for o, m in tests if o != "passed"]
    why = bad[0] if bad else (f"disabled: {disabled}" if disabled else "not up")
    return "failed", why


def table(results: list[vm.VmResult]) -> tuple[str, list[tuple[str, str, str]]]:
    lines = ["| kernel | " + " | ".join(SOURCES) + " |", "|---" * (len(SOURCES) + 1) + "|"]
    failures = []
    for r in results:
        cells = []
        for s in SOURCES:
            status, why = cell(s, r)
            cells.append(status + (f" ({why})" if why else ""))
            if status == "failed":
                failures.append((r.kernel.release, s, why))
        lines.append(f"| {r.kernel.release} ({r.kernel.suite}) | " + " | ".join(cells) + " |")
    return "\n".join(lines), failures


@pytest.fixture(scope="module")
def vm_tools() -> None:
    if os.geteuid() != 0:
        fail_or_skip("the kernel matrix needs root (debootstrap, chroot)")
    for tool in ("qemu-system-x86_64", "debootstrap", "cpio"):
        if not shutil.which(tool):
            fail_or_skip(f"{tool} is missing (make test installs qemu-system-x86, debootstrap, cpio)")
    if not Path("/bin/busybox").is_file():
        fail_or_skip("busybox is missing (make test installs busybox-static)")


# The image build (minutes, once; usually done in the background by then) and the guests, each
# bounded by VM_TIMEOUT, JOBS at a time.
@pytest.mark.timeout(900 + math.ceil(3 / max(JOBS, 1)) * VM_TIMEOUT + 600)
def test_agent_on_debian_kernels(vm_tools: None, otelcol_bin: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out_root = REPO / "out" / "kernel-matrix"
    lane = vm.background_lane(out_root)
    if lane is None:                 # no background lane (KERNEL_MATRIX_PREBUILD=0): all lanes here
        shutil.rmtree(out_root, ignore_errors=True)
    else:                            # the suite is done with the CPU: full priority from here
        os.setpriority(os.PRIO_PGRP, os.getpgid(lane), 0)
    t0 = time.monotonic()
    image, kernels = vm.ensure_image()
    t_image = time.monotonic() - t0
    vm.kvm_works(image, kernels[0])   # probed once (cached per host kernel), not by each guest
    lanes = max(JOBS - (lane is not None), 1)
    with ThreadPoolExecutor(lanes) as pool:
        for f in [pool.submit(vm.run_lane, image, kernels, out_root, Path(otelcol_bin).parent, VM_TIMEOUT)
                  for _ in range(lanes)]:
            f.result()
    # The background lane finishes the guest it runs (VM_TIMEOUT bounds it).
    while vm.background_lane(out_root) is not None:
        time.sleep(2)
    results = []
    for k in kernels:
        r = vm.VmResult.load(k, out_root / k.release)
        results.append(r if r is not None else vm.VmResult(k, -1, 0.0, "(no guest result: its lane died)",
                                                           out_root / k.release))
    text, failures = table(results)
    timings = ", ".join(f"{r.kernel.release} {r.seconds:.0f}s" for r in results)
    summary = (f"\nkernel matrix (image ready after {t_image:.0f}s more; VMs: {timings}; results in {out_root})\n"
               f"{text}\n")
    (out_root / "table.md").write_text(summary)
    with capsys.disabled():
        print(summary)
    for r in results:
        if any(k == r.kernel.release for k, _, _ in failures):
            with capsys.disabled():
                print(f"--- {r.kernel.release}: serial log (tail) ---\n{r.serial[-6000:]}")
    assert not failures, summary
