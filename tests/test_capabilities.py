"""The agent under exactly the capabilities we ship (no systemd here: ``setpriv`` grants the
systemd unit's set), and what it says when a capability is missing (issue 12): a denied bpf()
names the capability instead of "Failed to compile BPF module"; hidden kallsyms addresses name
CAP_SYSLOG; syscall names need neither the audit tools nor /usr/include."""

from __future__ import annotations

import configparser
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from receiver.kernel.capabilities import CAPABILITIES

from .harness import (
    REPO,
    Agent,
    Collector,
    agent_config,
    fail_or_skip,
    profile_kernel_frames,
    wait_until,
)

SYSTEMD_UNIT = REPO / "deploy" / "systemd" / "ebpf-otlp-receiver.service"
SOURCES = ("process", "profiler", "network", "syscalls")


def _setpriv(bounding: list[str]) -> list[str]:
    """uid 0 with only ``bounding`` (as CAP_* names): what systemd gives a User=root unit with
    CapabilityBoundingSet=, and Docker a root container with cap_add."""
    if not shutil.which("setpriv"):
        fail_or_skip("setpriv (util-linux) is not installed")
    caps = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in bounding])
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}", "--"]


def _drop(*caps: str) -> list[str]:
    """uid 0 with everything but ``caps``."""
    spec = ",".join(f"-{c.removeprefix('CAP_').lower()}" for c in caps)
    return ["setpriv", f"--bounding-set={spec}", "--"]


def _unit_caps() -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SYSTEMD_UNIT.read_text())
    return parser["Service"]["CapabilityBoundingSet"].split()


def test_the_unit_grants_the_capability_set() -> None:
    assert set(_unit_caps()) == {c.name for c in CAPABILITIES}


@pytest.mark.bpf
@pytest.mark.collector
def test_systemd_capability_set_runs_every_source_and_names_kernel_frames(
        bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """The unit's exact set: all four sources attach, and kernel frames are named (CAP_SYSLOG)."""
    busy = subprocess.Popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=64k", "count=100000000"],
                            stderr=subprocess.DEVNULL)
    try:
        cfg = agent_config(collector, {"process": {}, "network": {}, "syscalls": {},
                                       "profiler": {"preset": "development", "report_interval": "2s",
                                                    "filter": {"pids": [busy.pid]}}})
        agent = Agent(tmp_path, cfg, wrapper=_setpriv(_unit_caps())).start(timeout=180)
        try:
            for source in SOURCES:
                assert agent.metric_value("ebpf_receiver_source_up", source=source) == 1, agent.log()

            def named() -> set[str]:
                return profile_kernel_frames(collector.requests("profiles"))[1]

            names = wait_until(named, 60, 0.5, "named kernel frames in profiles.jsonl")
            assert names & {"read_zero", "iov_iter_zero", "clear_user", "clear_user_erms",
                            "rep_stos_alternative", "vfs_read", "ksys_read", "do_syscall_64",
                            "entry_SYSCALL_64_after_hwframe"}, names
            assert "no addresses" not in agent.log()
        finally:
            assert agent.stop() == 0
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.bpf
def test_without_cap_syslog_the_warning_names_it(bpf_ok: None) -> None:
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from receiver.profiling.symbols.kallsyms import KernelSymbols\n"
            "assert not KernelSymbols().available\n")
    r = subprocess.run([*_drop("CAP_SYSLOG"), sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert "lacks CAP_SYSLOG" in r.stderr and "grant CAP_SYSLOG" in r.stderr, r.stderr


@pytest.mark.bpf
def test_denied_bpf_is_told_apart_from_a_compile_error(bpf_ok: None) -> None:
    """Root without CAP_BPF (and CAP_SYS_ADMIN, which would cover it): loading says permission
    was denied and names CAP_BPF, not "Failed to compile BPF module"."""
    code = ("from receiver.errors import SourceUnavailableError\n"
            "from receiver.kernel.loader import compile_bpf\n"
            "try:\n"
            "    compile_bpf('process', 'process.bpf.c', ['-DHAS_GROUP_DEAD=1', '-DRINGBUF_PAGES=8',\n"
            "                '-DMAX_INFLIGHT_EXECS=64', '-DMAX_TRACKED_EXITS=64'])\n"
            "except SourceUnavailableError as e:\n"
            "    print('REASON', e.reason)\n")
    r = subprocess.run([*_drop("CAP_BPF", "CAP_SYS_ADMIN"), sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert "REASON permission denied" in r.stdout and "CAP_BPF" in r.stdout, r.stdout + r.stderr
    assert "Failed to compile" not in r.stdout
    # The same program compiles and loads with the capability (it is not a compile error).
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=REPO, check=False)
    assert ok.returncode == 0 and "REASON" not in ok.stdout, ok.stdout + ok.stderr


@pytest.mark.bpf
def test_check_and_run_name_the_missing_capability(bpf_ok: None, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"sources": {"process": {"enabled": True},
                                              "profiler": {"enabled": False},
                                              "network": {"enabled": False},
                                              "syscalls": {"enabled": False}},
                                  "telemetry": {"enabled": False},
                                  "exporter": {"endpoint": "http://127.0.0.1:9"}}))
    drop = _drop("CAP_BPF", "CAP_SYS_ADMIN")
    check = subprocess.run([*drop, sys.executable, "-m", "receiver", "check", "--config", str(config)],
                           capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert check.returncode != 0, check.stdout
    rows = {line.split()[0]: line for line in check.stdout.splitlines() if line.strip()}
    assert "missing" in rows["CAP_BPF"] and "ok" in rows["CAP_PERFMON"], check.stdout
    assert "permission denied" in check.stdout and "grant CAP_BPF" in check.stdout

    run = subprocess.Popen([*drop, sys.executable, "-m", "receiver", "run", "--config", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        out, _ = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        run.terminate()
        out, _ = run.communicate(timeout=30)
    assert "lacks CAP_BPF" in out and "Failed to compile" not in out, out


def test_syscall_names_need_no_audit_tools_nor_headers(tmp_path: Path) -> None:
    """As in the agent image: no ausyscall on PATH and no /usr/include (a tmpfs hides it)."""
    if platform.machine() != "x86_64":
        pytest.skip("the numbers below are x86_64's")
    if not shutil.which("unshare"):
        fail_or_skip("unshare (util-linux) is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    code = ("import json, shutil; assert not shutil.which('ausyscall')\n"
            "import os; assert not os.listdir('/usr/include')\n"
            "from receiver.kernel.syscall_table import syscall_names\n"
            "n = syscall_names(); print(json.dumps({k: n.get(k) for k in (0, 202, 232, 281, 441)}))\n")
    script = f"mount -t tmpfs none /usr/include && PATH={bindir} exec {sys.executable} -c \"$0\""
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script, code], capture_output=True,
                       text=True, timeout=60, cwd=REPO, check=False)
    if r.returncode and "mount" in r.stderr and "permission" in r.stderr.lower():
        fail_or_skip(f"cannot hide /usr/include here: {r.stderr}")
    assert r.returncode == 0, r.stderr
    names = json.loads(r.stdout.splitlines()[-1])
    assert names == {"0": "read", "202": "futex", "232": "epoll_wait", "281": "epoll_pwait",
                     "441": "epoll_pwait2"}
