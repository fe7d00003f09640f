"""``docker compose up`` for real (issue 12): docker-compose.yml as shipped, on Debian's own Docker
engine (tests/docker/engine.sh starts it with its own data root and socket) and Compose v2
(deploy/scripts/build-compose.sh). Images come from a registry where one answers, else from
local stand-ins under the same names that keep the real images' constraints (the Collector FROM
scratch as user 10001, no /tmp). Everything built is cached under ~/.cache/ebpf-otlp-receiver.

The override changes only what this host forces: published ports (free ones, on loopback), and,
after the shipped stack has shown it stays up, a directory for the Collector's files so the test
can read them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver.config import EbpfConfig

from .harness import (
    REPO,
    Collector,
    attributes,
    fail_or_skip,
    free_port,
    profile_kernel_frames,
    wait_until,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

DOCKER = "/usr/bin/docker"          # Debian's CLI, not whatever else is on PATH
ENGINE = REPO / "tests" / "docker" / "engine.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER20_ENV = REPO / "deploy" / "compose" / "docker20.env"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def _run(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{what}: timed out after {timeout}s: {e.stderr}") from None
    if r.returncode:
        raise AssertionError(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r.stdout


class Stack:
    """One compose project: the shipped file plus the test's override files."""

    def __init__(self, compose_bin: str, env: dict[str, str], workdir: Path):
        self.env, self.workdir = env, workdir
        self.project = f"ebpf-deploy-{os.getpid()}"
        self.ports = {"otelcol": free_port(), "agent": free_port(), "prometheus": free_port()}
        self.base = [compose_bin, "-p", self.project, "--project-directory", str(REPO)]
        server = _run([DOCKER, "version", "-f", "{{.Server.Version}}"], env, 60, "docker version").strip()
        self.server_version = server
        # Docker < 23 rejects the BPF/PERFMON names: the documented env file, as the README says.
        if int(server.split(".")[0]) < 23:
            self.base += ["--env-file", str(DOCKER20_ENV)]
        self.files = ["-f", str(COMPOSE_FILE), "-f", str(self._ports_override())]

    def _ports_override(self) -> Path:
        p = self.workdir / "ports.override.yml"
        ports = {"otelcol": 4317, "agent": 9464, "prometheus": 9090}
        p.write_text(yaml.safe_dump({"services": {
            name: {"ports": [f"127.0.0.1:{self.ports[name]}:{port}"]} for name, port in ports.items()
        }}).replace("ports:", "ports: !override"))
        return p

    def output_override(self, outdir: Path) -> None:
        """The Collector's files into ``outdir`` (the host reads them); nothing else changes."""
        p = self.workdir / "output.override.yml"
        p.write_text(yaml.safe_dump({"services": {"otelcol": {
            "volumes": [f"{outdir}:/test-out"], "environment": {"OTELCOL_OUTPUT_DIR": "/test-out"}}}}))
        self.files += ["-f", str(p)]

    def compose(self, *args: str, timeout: float = 300) -> str:
        return _run([*self.base, *self.files, *args], self.env, timeout, f"docker compose {args[0]}")

    def docker(self, *args: str, timeout: float = 60) -> str:
        return _run([DOCKER, *args], self.env, timeout, f"docker {args[0]}")

    def container(self, service: str) -> dict[str, Any]:
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"no container for {service}: {self.compose('ps', '-a')}"
        return json.loads(self.docker("inspect", cid))[0]

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "80", timeout=60)
        except AssertionError as e:
            return str(e)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if os.geteuid() != 0:
        fail_or_skip("the deployment test starts a Docker engine: needs root")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    was_running = subprocess.run(["bash", str(ENGINE), "status"], capture_output=True,
                                 timeout=60, check=False).returncode == 0
    try:
        host = subprocess.run(["bash", str(ENGINE), "start"], capture_output=True, text=True,
                              timeout=900, check=True).stdout.strip().splitlines()[-1]
        compose_bin = subprocess.run(["bash", str(REPO / "deploy/scripts/build-compose.sh")],
                                     capture_output=True, text=True, timeout=1800,
                                     check=True).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, IndexError) as e:
        fail_or_skip(f"no Docker engine or Compose: {getattr(e, 'stderr', e)}"[-3000:])
    env.update(DOCKER_HOST=host, DOCKER_BUILDKIT="0", COMPOSE_BAKE="false")
    # Images the compose file names: pulled, or local stand-ins (cached, rebuilt on change).
    _run(["bash", str(ENGINE), "images", str(COMPOSE_FILE)], env, 1800, "stand-in images")
    # pip inside `docker build` reaches PyPI here only with the host's CA bundle.
    if HOST_CA.is_file():
        shutil.copyfile(HOST_CA, REPO / "deploy" / "ca-certificates" / "host-ci.crt")
    s = Stack(compose_bin, env, tmp_path_factory.mktemp("compose"))
    try:
        yield s
    finally:
        subprocess.run([*s.base, *s.files, "down", "-v", "--remove-orphans", "-t", "30"], env=env,
                       capture_output=True, timeout=300, cwd=REPO, check=False)
        (REPO / "deploy" / "ca-certificates" / "host-ci.crt").unlink(missing_ok=True)
        if not was_running:   # what it built stays in the data root for the next run
            subprocess.run(["bash", str(ENGINE), "stop"], capture_output=True, timeout=120, check=False)


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _agent_bpf_prog_ids(pid: int) -> set[int]:
    """IDs of the BPF programs whose file descriptors the process holds (from its fdinfo)."""
    ids = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for f in fdinfo.iterdir():
        try:
            for line in f.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def _loaded_prog_ids() -> set[int]:
    r = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return {p["id"] for p in json.loads(r.stdout or "[]")}


def _syscall_names() -> dict[int, str]:
    from receiver.kernel.syscall_table import syscall_names

    return syscall_names()


def test_compose_up_as_shipped(stack: Stack, tmp_path: Path) -> None:
    if not shutil.which("bpftool"):
        fail_or_skip("bpftool is not installed (tests/docker/engine.sh start installs it)")
    stack.compose("up", "-d", "--build", timeout=1800)
    try:
        _shipped_stack_runs(stack)
        outdir = tmp_path / "otelcol-out"
        outdir.mkdir()
        outdir.chmod(0o777)   # the Collector writes as user 10001
        stack.output_override(outdir)
        stack.compose("up", "-d", "--no-deps", "otelcol", timeout=300)
        collector = Collector("", tmp_path)
        collector.outdir = outdir
        agent_pid = stack.container("agent")["State"]["Pid"]
        prog_ids = _agent_bpf_prog_ids(agent_pid)
        assert len(prog_ids) >= 4, f"the agent holds BPF programs {prog_ids}"
        _data_reaches_the_collector(stack, collector)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- compose logs ---\n{stack.logs()}") from None
    stack.compose("down", "-t", "30", timeout=300)
    left = prog_ids & _loaded_prog_ids()
    assert not left, f"BPF programs still loaded after docker compose down: {left}"


def _shipped_stack_runs(stack: Stack) -> None:
    """The shipped files alone (ports aside): the agent turns healthy, the Collector stays up,
    Prometheus scrapes the agent and answers a PromQL query of its metrics."""
    def healthy() -> bool:
        state = stack.container("agent")["State"]
        assert state["Status"] != "exited", f"agent exited: {state}"
        return state.get("Health", {}).get("Status") == "healthy"

    wait_until(healthy, 300, 2, "the agent's healthcheck to pass")
    prom = f"http://127.0.0.1:{stack.ports['prometheus']}"

    def target_up() -> bool:
        data = _get_json(f"{prom}/api/v1/targets") or {}
        targets = data.get("data", {}).get("activeTargets", [])
        return any(t["labels"].get("job") == "ebpf-otlp-receiver" and t["health"] == "up" for t in targets)

    wait_until(target_up, 120, 2, "Prometheus's target for the agent to be up")
    query = urllib.parse.quote("ebpf_receiver_source_up == 1")

    def sources_up() -> set[str]:
        data = _get_json(f"{prom}/api/v1/query?query={query}") or {}
        names = {r["metric"].get("source") for r in data.get("data", {}).get("result", [])}
        return names if names >= {"process", "profiler", "network", "syscalls"} else set()

    wait_until(sources_up, 120, 2, "PromQL: every source up")
    sent = urllib.parse.quote("sum(ebpf_receiver_exporter_sent_items_total) > 0")
    wait_until(lambda: (_get_json(f"{prom}/api/v1/query?query={sent}") or {}).get("data", {}).get("result"),
               120, 2, "PromQL: the agent has sent items to the Collector")
    # The Collector, with the shipped config in the shipped image layout, has been receiving all
    # along without a restart.
    otelcol = stack.container("otelcol")
    assert otelcol["State"]["Running"] and otelcol["RestartCount"] == 0, otelcol["State"]
    assert "Everything is ready" in stack.compose("logs", "--no-color", "otelcol", timeout=60)


def _data_reaches_the_collector(stack: Stack, collector: Collector) -> None:
    # A workload in a container of its own: its execs carry its container.id.
    workload = stack.docker(
        "run", "-d", "--rm", "debian:bookworm-slim", "sh", "-c",
        # `sleep 1 | cat`: cat's read() of the pipe blocks until sleep exits, a slow call that is
        # not excluded (a span), while sleep's own clock_nanosleep is as slow and excluded.
        "while :; do dd if=/dev/zero of=/dev/null bs=64k count=20000 2>/dev/null; sleep 1 | cat; done").strip()
    try:
        # Wait for the workload's own `dd`: the container's first exec is the runtime's (seen as
        # /dev/fd/N) and may arrive in a batch of its own, before any dd (CI of 711bfe8).
        def workload_dd_execs() -> list[dict[str, Any]]:
            return [r for r in collector.log_records() if r.get("eventName") == "process.exec"
                    and r["resource"].get("container.id") == workload
                    and str(r["attrs"].get("process.executable.path")).endswith("/dd")]

        wait_until(workload_dd_execs, 120, 1, "exec logs of dd carrying the workload's container.id")

        # Syscall metrics carry names (the agent image has no ausyscall, no /usr/include).
        def syscall_names_seen() -> set[str]:
            names = set()
            for m in collector.metrics():
                if m.get("name") == "syscall.calls":
                    for dp in m.get("sum", {}).get("dataPoints", []):
                        names.add(attributes(dp.get("attributes")).get("syscall.name"))
            return names if "futex" in names else set()

        names = wait_until(syscall_names_seen, 120, 1, "syscall.calls with syscall.name=futex")
        unnamed = sorted(n for n in names if str(n).startswith("syscall_"))
        assert not unnamed, unnamed

        # A profile with named kernel frames (CAP_SYSLOG: kallsyms shows addresses).
        def kernel_names() -> set[str]:
            return profile_kernel_frames(collector.requests("profiles"))[1]

        wait_until(kernel_names, 120, 1, "a profile with named kernel frames")

        # Slow spans are there where expected: the workload's cat waited about 1 s in read()
        # (at least slow_threshold, 10 ms, unless cat took 0.99 s to start: no load does that).
        threshold_ns = EbpfConfig.default().sources.syscalls.slow_threshold * 1e9
        cat_reads = wait_until(lambda: _workload_spans(collector, workload, "cat", "read"), 120, 1,
                               "a slow-call span of the workload's cat blocked in read()")
        durations = [int(s["endTimeUnixNano"]) - int(s["startTimeUnixNano"]) for s in cat_reads]
        assert all(d >= threshold_ns for d in durations), durations
        # ... and the workload's sleep spent about 1 s per call in clock_nanosleep, excluded by
        # default: the host-wide histogram shows such calls (max past half a second), and none of
        # them from the workload's sleep processes is a span.
        def slow_excluded_calls() -> float:
            return max((float(dp.get("max", 0)) for m in collector.metrics()
                        if m.get("name") == "syscall.duration" and "process.pid" not in m["resource"]
                        for dp in m.get("exponentialHistogram", {}).get("dataPoints", [])
                        if attributes(dp.get("attributes")).get("syscall.name") == "clock_nanosleep"),
                       default=0.0) >= 0.5e9

        wait_until(slow_excluded_calls, 120, 1, "host-wide clock_nanosleep calls past 0.5 s")
        sleeps = [s["name"] for s in _workload_spans(collector, workload, "sleep")]
        assert "clock_nanosleep" not in sleeps and "nanosleep" not in sleeps, sleeps
    finally:
        subprocess.run([DOCKER, "rm", "-f", workload], env=stack.env, capture_output=True, timeout=60, check=False)
    # No call that blocks by design became a slow-call span (judged by number, so a name the agent
    # could not resolve does not slip through); slow-call spans of other calls are there (above).
    excluded = set(EbpfConfig.default().sources.syscalls.slow_exclude)
    table = _syscall_names()
    slow = [s for s in collector.spans() if "syscall.nr" in s["attrs"]]
    assert slow, "no slow-call spans at all"
    bad = [(s["name"], s["attrs"]["syscall.nr"]) for s in slow
           if table.get(int(s["attrs"]["syscall.nr"])) in excluded or s["name"] in excluded]
    assert not bad, f"{len(bad)} slow-call spans of excluded calls, e.g. {bad[:5]}"


def _workload_spans(collector: Collector, container: str, program: str,
                    name: str | None = None) -> list[dict[str, Any]]:
    """Slow-call spans (named ``name``, if given) of the processes that exec'd ``program`` in
    ``container`` (pids from their exec logs: a short-lived process's span may carry no
    container.id of its own)."""
    pids = {r["attrs"].get("process.pid") for r in collector.log_records()
            if r.get("eventName") == "process.exec" and r["resource"].get("container.id") == container
            and str(r["attrs"].get("process.executable.path")).endswith("/" + program)}
    return [s for s in collector.spans() if "syscall.nr" in s["attrs"] and s["attrs"].get("process.pid") in pids
            and (name is None or s["name"] == name)]
