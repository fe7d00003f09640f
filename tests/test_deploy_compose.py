"""``docker compose up`` for real (issue 12): docker-compose.yml as shipped, on Debian's own Docker
engine (tests/docker/engine.sh starts it with its own data root and socket) and Compose v2
(deploy/scripts/build-compose.sh). Images come from a registry where one answers, else from
local stand-ins under the same names that keep the real images' constraints (the Collector FROM
scratch as user 10001, no /tmp). Everything built is cached under ~/.cache/ebpf-otlp-receiver.

The override changes only what this host forces: published ports (free ones, on loopback), and,
after the shipped stack has shown it stays up, a directory for the Collector's files so the test
can read them, and the agent's config with the ``http`` source turned on (it is off by default,
in the shipped config too: it reads every process's traffic) for the workload's HTTP server.

Workloads run in containers of their own (the agent sees them through the host PID namespace
only, in other mount namespaces): a shell loop, a JVM (the Temurin JDK mounted where the
eclipse-temurin images keep it, /opt/java/openjdk), Node (at /usr/local/bin/node, as in the node
images) burning CPU, and a Node HTTP server. The runtimes are the host's, bind-mounted read-only
at paths the host and the agent's container do not have: the agent can only reach their files
through /proc/PID (issues 26, 27, 30)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from receiver.config import EbpfConfig

from .harness import (
    REPO,
    Collector,
    any_value,
    attributes,
    fail_or_skip,
    free_port,
    profile_kernel_frames,
    wait_until,
)
from .profiling import test_jvm_e2e as jvm_e2e
from .profiling import test_v8_e2e as v8_e2e
from .sources.http_support import ERROR, SERVER_KIND

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

DOCKER = "/usr/bin/docker"          # Debian's CLI, not whatever else is on PATH
ENGINE = REPO / "tests" / "docker" / "engine.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER20_ENV = REPO / "deploy" / "compose" / "docker20.env"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
AGENT_CONFIG = REPO / "deploy" / "config" / "agent.yaml"   # baked into the agent image

# The runtimes in the workload containers: the host's, mounted read-only where their official
# images keep them (paths that exist neither on the host nor in the agent's container).
JDK = Path("/usr/lib/jvm/temurin-25-jdk-amd64")
JDK_IN_CONTAINER = "/opt/java/openjdk"
NODE = Path("/usr/bin/node")
NODE_IN_CONTAINER = "/usr/local/bin/node"
APP_IN_CONTAINER = "/app"       # the programs, compiled on the host
HTTP_PORT = 8080                # the workload's HTTP server, in its container's network namespace

# A plaintext HTTP/1.1 server (Node's http): 404 under /missing, 500 for /boom, else 200.
HTTP_SERVER_JS = """\
'use strict';
const http = require('http');
http.createServer((req, res) => {
  const [status, body] = req.url.startsWith('/missing') ? [404, 'no\\n']
    : req.url === '/boom' ? [500, 'boom\\n'] : [200, 'ok\\n'];
  req.resume();
  req.on('end', () => { res.writeHead(status, {'Content-Type': 'text/plain'}); res.end(body); });
}).listen(Number(process.argv[2]), '0.0.0.0');
"""


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

    def http_override(self) -> None:
        """The agent's config with the http source on, for the workload's server port (the
        shipped config, baked into the image, keeps it off); nothing else changes."""
        config = yaml.safe_load(AGENT_CONFIG.read_text())
        config["sources"]["http"] = {"enabled": True, "ports": [HTTP_PORT], "report_interval": "2s"}
        cfg = self.workdir / "agent.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cfg.chmod(0o644)
        p = self.workdir / "http.override.yml"
        p.write_text(yaml.safe_dump({"services": {"agent": {
            "volumes": [f"{cfg}:/etc/ebpf-otlp-receiver/config.yaml:ro"]}}}))
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
    t0 = time.monotonic()
    stack.compose("up", "-d", "--build", timeout=1800)
    phases = {"up --build": time.monotonic() - t0}
    runtimes = None
    try:
        _shipped_stack_runs(stack)
        phases["shipped stack checked"] = time.monotonic() - t0
        outdir = tmp_path / "otelcol-out"
        outdir.mkdir()
        outdir.chmod(0o777)   # the Collector writes as user 10001
        stack.output_override(outdir)
        stack.http_override()
        stack.compose("up", "-d", "--no-deps", "otelcol", "agent", timeout=300)
        _agent_serves_http(stack)
        ready_ns = time.time_ns()
        phases["agent restarted with http, ready"] = time.monotonic() - t0
        runtimes = Runtimes(stack, tmp_path / "app")
        collector = Collector("", tmp_path)
        collector.outdir = outdir
        agent_pid = stack.container("agent")["State"]["Pid"]
        prog_ids = _agent_bpf_prog_ids(agent_pid)
        assert len(prog_ids) >= 5, f"the agent holds BPF programs {prog_ids}"
        _data_reaches_the_collector(stack, collector, ready_ns)
        phases["workload data checked"] = time.monotonic() - t0
        print(_java_and_js_frames_named(collector, runtimes))
        phases["java and js frames checked"] = time.monotonic() - t0
        _request_spans_from_the_container(collector, runtimes)
        phases["request spans checked"] = time.monotonic() - t0
        print("compose test phases (s since up):", {k: round(v) for k, v in phases.items()})
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- compose logs ---\n{stack.logs()}") from None
    finally:
        if runtimes is not None:
            runtimes.remove()
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


def _data_reaches_the_collector(stack: Stack, collector: Collector, ready_ns: int) -> None:
    """``ready_ns``: when the agent that exports to this Collector output was ready. (A source
    that loads from the compile cache while another compiles can run a while before its filter
    maps are filled: its start-up is not what this test judges.)"""
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
    slow = [s for s in collector.spans() if "syscall.nr" in s["attrs"] and int(s["startTimeUnixNano"]) >= ready_ns]
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


class Runtimes:
    """The runtime workloads, each the main process of a container of its own: a JVM and Node
    running the 3:1 split programs of the JVM and V8 tests, and a Node HTTP server."""

    def __init__(self, stack: Stack, appdir: Path):
        for path in (JDK / "bin" / "javac", NODE):
            if not path.exists():
                pytest.fail(f"{path} is not installed (the workload containers mount it)")
        self.stack = stack
        appdir.mkdir()
        appdir.chmod(0o755)
        (appdir / "Hot.java").write_text(jvm_e2e.SPLIT_SOURCE)
        _run([str(JDK / "bin" / "javac"), "-d", str(appdir), str(appdir / "Hot.java")], stack.env, 300, "javac")
        (appdir / "split.js").write_text(v8_e2e.SPLIT_SOURCE)
        (appdir / "server.js").write_text(HTTP_SERVER_JS)
        app = ["-v", f"{appdir}:{APP_IN_CONTAINER}:ro"]
        jdk = ["-v", f"{JDK}:{JDK_IN_CONTAINER}:ro"]
        node = ["-v", f"{NODE}:{NODE_IN_CONTAINER}:ro"]
        # The programs run until a stop file that never appears: `docker rm -f` ends them. Half
        # a core each: enough samples, and the agent's compiles (and the machine) keep the rest.
        self.ids: dict[str, str] = {}
        try:
            for name, mounts, command in (
                    ("jvm", jdk, [f"{JDK_IN_CONTAINER}/bin/java", "-cp", APP_IN_CONTAINER, "Hot", "/tmp/stop"]),
                    ("node", node, [NODE_IN_CONTAINER, f"{APP_IN_CONTAINER}/split.js", "/tmp/stop"]),
                    ("http", node, [NODE_IN_CONTAINER, f"{APP_IN_CONTAINER}/server.js", str(HTTP_PORT)])):
                self.ids[name] = stack.docker("run", "-d", "--name", f"{stack.project}-{name}", "--cpus", "0.5",
                                              *app, *mounts, "debian:bookworm-slim", *command).strip()
            self.pids: dict[str, int] = {}
            for name, cid in self.ids.items():
                state = json.loads(self.stack.docker("inspect", cid))[0]["State"]
                assert state["Running"], f"{name}: {state}\n{self.stack.docker('logs', cid)}"
                self.pids[name] = int(state["Pid"])
            net = json.loads(self.stack.docker("inspect", self.ids["http"]))[0]["NetworkSettings"]
            self.http_ip: str = net["IPAddress"]
            wait_until(lambda: _listening(self.http_ip, HTTP_PORT), 60, 0.2, "the workload's HTTP server")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for cid in self.ids.values():
            subprocess.run([DOCKER, "rm", "-f", cid], env=self.stack.env, capture_output=True, timeout=60, check=False)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _agent_serves_http(stack: Stack) -> None:
    """The agent, restarted with the http source on, is ready (every source started, the
    exporter running: /readyz) and reports that source up (/metrics)."""
    up = re.compile(r'^ebpf_receiver_source_up\{[^}]*source="http"[^}]*\} 1(\.0)?$', re.M)

    def http_up() -> bool:
        state = stack.container("agent")["State"]
        assert state["Status"] != "exited", f"agent exited: {state}"
        agent = f"http://127.0.0.1:{stack.ports['agent']}"
        try:
            with urllib.request.urlopen(f"{agent}/readyz", timeout=5) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(f"{agent}/metrics", timeout=5) as r:
                return bool(up.search(r.read().decode()))
        except OSError:
            return False

    wait_until(http_up, 400, 1, "the restarted agent to be ready with its http source up")


class Frame(NamedTuple):
    """One frame of a sample at the Collector."""

    name: str
    file: str
    line: int
    type: str     # profile.frame.type


def _decoded(kvs: list[dict[str, Any]], strings: list[str]) -> dict[str, Any]:
    """OTLP profile attributes: keys and string values inline or as string-table indices."""
    out = {}
    for kv in kvs:
        value = kv.get("value", {})
        out[kv["key"] if "key" in kv else strings[kv.get("keyStrindex", 0)]] = \
            strings[value["stringValueStrindex"]] if "stringValueStrindex" in value else any_value(value)
    return out


def _profile_samples(collector: Collector) -> list[tuple[list[Frame], dict[str, Any], int]]:
    """(frames leaf first, resource and sample attributes, count) of every sample the Collector
    wrote, decoded through each request's dictionary."""
    out = []
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings, funcs = d.get("stringTable", []), d.get("functionTable", [])
        locs, stacks, table = d.get("locationTable", []), d.get("stackTable", []), d.get("attributeTable", [])

        for rp in req.get("resourceProfiles", []):
            res = _decoded(rp.get("resource", {}).get("attributes", []), strings)
            for sp in rp.get("scopeProfiles", []):
                for prof in sp.get("profiles", []):
                    for s in prof.get("samples", []):
                        frames = []
                        for li in stacks[s.get("stackIndex", 0)].get("locationIndices", []):
                            loc = locs[li]
                            kind = _decoded([table[i] for i in loc.get("attributeIndices", [])], strings).get(
                                "profile.frame.type", "")
                            for line in loc.get("lines", []):
                                f = funcs[line.get("functionIndex", 0)]
                                frames.append(Frame(strings[f.get("nameStrindex", 0)],
                                                    strings[f.get("filenameStrindex", 0)],
                                                    int(line.get("line", 0)), kind))
                        attrs = {**res, **_decoded([table[i] for i in s.get("attributeIndices", [])], strings)}
                        out.append((frames, attrs, int(s["values"][0])))
    return out


class Chains:
    """A runtime's hot samples of one process at the Collector: those whose innermost frame of
    ``frame_type`` is one of ``leaves``, and of those the ones with the whole ``chain`` under it
    by name, each frame in ``file``."""

    def __init__(self, pid: int, frame_type: str, leaves: set[str], chain: list[str], file: str):
        self.pid, self.frame_type, self.leaves, self.chain, self.file = pid, frame_type, leaves, chain, file
        self.hot = self.whole = 0
        self.containers: set[Any] = set()
        self.frames: set[Frame] = set()

    def count(self, collector: Collector) -> "Chains":
        self.hot = self.whole = 0
        self.containers.clear()
        self.frames.clear()
        for frames, attrs, n in _profile_samples(collector):
            if attrs.get("process.pid") != self.pid:
                continue
            self.containers.add(attrs.get("container.id"))
            ours = [f for f in frames if f.type == self.frame_type]
            self.frames.update(ours)
            if not ours or ours[0].name not in self.leaves:
                continue
            self.hot += n
            top = ours[:1 + len(self.chain)]
            if [f.name for f in top[1:]] == self.chain and all(f.file == self.file for f in top):
                self.whole += n
        return self

    def __repr__(self) -> str:
        return (f"pid {self.pid}: {self.whole} of {self.hot} hot samples with the whole chain; "
                f"containers {self.containers}; frames e.g. {sorted(self.frames)[:12]}")


def _java_and_js_frames_named(collector: Collector, rt: Runtimes) -> dict[str, Chains]:
    """The JVM's and Node's hot samples reach the Collector with their whole chain of Java and
    JavaScript frames by name (Java: class.method(signature) in Hot.java; JS: the function in
    the script at its path in the container), carrying their container's id."""
    defs = {m[1]: i for i, text in enumerate(v8_e2e.SPLIT_SOURCE.splitlines(), 1)
            if (m := re.search(r"// DEF (\w+)", text))}
    script = f"{APP_IN_CONTAINER}/split.js"
    runtimes = {
        "jvm": Chains(rt.pids["jvm"], "jvm", set(jvm_e2e.HOT.values()), jvm_e2e.CHAIN, "Hot.java"),
        "node": Chains(rt.pids["node"], "v8js", {"jsHotA", "jsHotB"}, ["stage2", "stage1", "dispatch", "runLoop"],
                       script),
    }
    wait_until(lambda: all(c.count(collector).whole >= 20 for c in runtimes.values()), 300, 2,
               f"20 samples with the whole chain from the JVM and from Node: {runtimes}")
    for name, c in runtimes.items():
        assert c.containers == {rt.ids[name]}, c
        # (a sample taken as the runtime's entry loads may miss a frame or two of its chain)
        assert c.whole >= 0.9 * c.hot, c
    js = runtimes["node"].frames
    for fn in ("jsHotA", "jsHotB", "stage2", "stage1", "dispatch", "runLoop"):
        assert Frame(fn, script, defs[fn], "v8js") in js, (fn, sorted(js)[:20])
    return runtimes


# (method, target, body, status): each on a new connection, then all on one keep-alive connection
REQUESTS = [("GET", "/orders/1", None, 200), ("GET", "/missing/7", None, 404), ("POST", "/orders", b'{"n": 2}', 200),
            ("GET", "/orders/3?expand=items", None, 200), ("GET", "/boom", None, 500)]


def _request_spans_from_the_container(collector: Collector, rt: Runtimes) -> None:
    """Every request to the workload's HTTP server is one SERVER span of that server's process
    (its container's id on the resource) with method, path and status, and one CLIENT span of
    this process (on the host)."""
    expected = []
    for keep_alive in (False, True):
        conn = http.client.HTTPConnection(rt.http_ip, HTTP_PORT, timeout=10)
        for method, target, body, status in REQUESTS:
            if not keep_alive:
                conn = http.client.HTTPConnection(rt.http_ip, HTTP_PORT, timeout=10)
            conn.request(method, target, body=body)
            r = conn.getresponse()
            r.read()
            assert r.status == status, (method, target, r.status)
            expected.append((method, target.split("?")[0], status))
            if not keep_alive:
                conn.close()
        conn.close()
    n = len(expected)

    def spans() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {"server": [], "client": []}
        for s in collector.spans():
            a = s["attrs"]
            if "http.request.method" not in a or a.get("server.port") != HTTP_PORT:
                continue
            if s["kind"] in SERVER_KIND and s["resource"].get("process.pid") == rt.pids["http"]:
                out["server"].append(s)
            elif s["kind"] not in SERVER_KIND and s["resource"].get("process.pid") == os.getpid():
                out["client"].append(s)
        for v in out.values():
            v.sort(key=lambda s: int(s["startTimeUnixNano"]))
        return out

    wait_until(lambda: all(len(v) >= n for v in spans().values()), 60, 0.5,
               f"{n} SERVER spans of the workload's HTTP server and {n} CLIENT spans of the test")
    time.sleep(2)   # a duplicate would have arrived by now
    got = spans()
    assert {k: len(v) for k, v in got.items()} == {"server": n, "client": n}, \
        [(k, s["name"], s["attrs"].get("url.path")) for k, v in got.items() for s in v]
    for (method, path, status), srv, cli in zip(expected, got["server"], got["client"], strict=True):
        for s in (srv, cli):
            a = s["attrs"]
            assert s["name"] == method and a["http.request.method"] == method and a["url.path"] == path, s
            assert a["http.response.status_code"] == status and a["url.scheme"] == "http", a
            assert "url.query" not in a and a["network.protocol.version"] == "1.1", a
            assert a["server.address"] == rt.http_ip, a
        assert srv["attrs"]["client.port"] == cli["attrs"]["client.port"] > 0
        assert srv["resource"].get("container.id") == rt.ids["http"], srv["resource"]
        assert (srv.get("status", {}).get("code") in ERROR) == (status >= 500), srv
