"""Test harness: the real Collector (file exporter output read back), the agent as a real
process, and helpers for OTLP/JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COLLECTOR_CONFIG = REPO / "deploy" / "otelcol" / "config.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Emulated guests (the kernel matrix runs under TCG) are several times slower than this host:
# guest.sh stretches every wait by this factor rather than each test guessing its own margin.
TIME_SCALE = float(os.environ.get("EBPF_TEST_TIME_SCALE", "1"))
# The fuzz and property tests' example counts: `make test` runs them whole, `make test-unit` (the
# quick tier before each commit) a quarter of each (EBPF_TEST_FUZZ_SCALE=0.25).
FUZZ_SCALE = float(os.environ.get("EBPF_TEST_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """``n`` Hypothesis examples, scaled for the tier that runs them (at least 25)."""
    return max(25, round(n * FUZZ_SCALE))


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def in_ci() -> bool:
    """``CI`` set to true, 1 or yes (any case): .ci/run exports CI=true."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def fail_or_skip(reason: str) -> None:
    """Outside CI a missing prerequisite skips with its reason; in CI (see ``in_ci``) it fails:
    the BPF, Collector and Go tests must run there. (tests/conftest.py also turns any other
    skip into a failure in CI.)"""
    import pytest

    if in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def compile_c(source: str, out: Path, *flags: str, cxx: bool = False) -> Path:
    """Builds a test program with gcc, or g++ with ``cxx`` (``make test`` installs both; a
    missing compiler is an error, not a skip)."""
    src = out.with_name(out.name + (".cc" if cxx else ".c"))
    src.write_text(source)
    subprocess.run(["g++" if cxx else "gcc", *flags, "-o", str(out), str(src)], check=True)
    return out


def any_value(v: dict[str, Any]) -> Any:
    """OTLP/JSON AnyValue → Python value."""
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return v["boolValue"]
    if "arrayValue" in v:
        return [any_value(x) for x in v["arrayValue"].get("values", [])]
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def attributes(kvs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {kv["key"]: any_value(kv.get("value", {})) for kv in kvs or []}


class Collector:
    """The real Collector on free loopback ports (OTLP/gRPC on ``port``, OTLP/HTTP on
    ``http_port`` where its config has an HTTP receiver), writing JSON lines per signal."""

    def __init__(self, binary: str, workdir: Path, config: Path = COLLECTOR_CONFIG,
                 port: int | None = None, http_port: int | None = None):
        self.binary, self.workdir, self.config = binary, workdir, config
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.outdir = workdir / "otelcol-out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "otelcol.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, extra_env: dict[str, str] | None = None) -> "Collector":
        self.outdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.port}",
               "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.http_port}",
               "OTELCOL_OUTPUT_DIR": str(self.outdir), **(extra_env or {})}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [self.binary, "--config", str(self.config), "--feature-gates=service.profilesSupport"],
                env=env, stdout=logf, stderr=subprocess.STDOUT)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Collector exited: {self.log_path.read_text()[-3000:]}")
            ports = [self.port] + ([self.http_port] if "OTELCOL_OTLP_HTTP_ENDPOINT" in
                                   self.config.read_text() else [])
            for port in ports:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) != 0:
                        return False
            return True

        wait_until(listening, 30, what="the Collector to listen")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def requests(self, signal_name: str) -> list[dict[str, Any]]:
        """Every export request the Collector wrote for a signal (one JSON object per line)."""
        path = self.outdir / f"{signal_name}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written right now
        return out

    def log_records(self) -> list[dict[str, Any]]:
        """Flattened: each log record with ``resource`` and ``attrs`` dicts added."""
        out = []
        for req in self.requests("logs"):
            for rl in req.get("resourceLogs", []):
                res = attributes(rl.get("resource", {}).get("attributes"))
                for sl in rl.get("scopeLogs", []):
                    for rec in sl.get("logRecords", []):
                        out.append({**rec, "resource": res, "attrs": attributes(rec.get("attributes"))})
        return out

    def spans(self) -> list[dict[str, Any]]:
        out = []
        for req in self.requests("traces"):
            for rs in req.get("resourceSpans", []):
                res = attributes(rs.get("resource", {}).get("attributes"))
                for ss in rs.get("scopeSpans", []):
                    for sp in ss.get("spans", []):
                        out.append({**sp, "resource": res, "attrs": attributes(sp.get("attributes"))})
        return out

    def metric_points(self, name: str, pid: int) -> list[dict[str, Any]]:
        """Data points of metric ``name`` from ``pid``'s resource, with ``attrs`` decoded."""
        out = []
        for m in self.metrics():
            if m.get("name") != name or m["resource"].get("process.pid") != pid:
                continue
            body = m.get("sum") or m.get("exponentialHistogram") or m.get("gauge") or {}
            for dp in body.get("dataPoints", []):
                out.append({**dp, "attrs": attributes(dp.get("attributes"))})
        return out

    def metrics(self) -> list[dict[str, Any]]:
        out = []
        for req in self.requests("metrics"):
            for rm in req.get("resourceMetrics", []):
                res = attributes(rm.get("resource", {}).get("attributes"))
                for sm in rm.get("scopeMetrics", []):
                    for m in sm.get("metrics", []):
                        out.append({**m, "resource": res})
        return out


class Agent:
    """``ebpf-otlp-receiver run`` as a real process, with a config written for the test."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None):
        self.workdir = workdir
        self.wrapper = wrapper or []   # e.g. setpriv with a capability set
        self.metrics_port = free_port()
        config = dict(config)
        config.setdefault("telemetry", {})
        config["telemetry"] = {"listen": f"127.0.0.1:{self.metrics_port}", **config["telemetry"]}
        self.config_path = workdir / f"agent-{self.metrics_port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"agent-{self.metrics_port}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float | None = None) -> "Agent":
        # Emulated guests (tests/kernels) compile BPF programs several times slower.
        timeout = timeout or float(os.environ.get("EBPF_TEST_AGENT_READY_TIMEOUT", "90"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(self.env)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([*self.wrapper, sys.executable, "-m", "receiver", "run", "--config",
                                          str(self.config_path)], env=env, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=REPO)
        if wait_ready:
            wait_until(self._ready, timeout, 0.2, "the agent to be ready")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric_value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(self.scrape()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        timeout *= TIME_SCALE    # an emulated guest also flushes to its Collector slowly
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent did not stop within {timeout}s: {self.log()[-3000:]}") from None
        return self.proc.returncode


def agent_config(collector: Collector, sources: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A config with only ``sources`` enabled, exporting quickly to ``collector``."""
    all_sources = {name: {"enabled": False} for name in ("process", "profiler", "network", "syscalls")}
    for name, cfg in sources.items():
        all_sources[name] = {"enabled": True, **cfg}
    exporter = {"endpoint": collector.endpoint, "batch_timeout": "200ms", **sections.pop("exporter", {})}
    return {"exporter": exporter, "sources": all_sources, **sections}


def _decoded_kv(kv: dict[str, Any], strings: list[str]) -> tuple[str, Any]:
    """An attribute as the Collector writes profiles: key and string values inline or as
    string-table indices."""
    key = kv["key"] if "key" in kv else strings[kv.get("keyStrindex", 0)]
    value = kv.get("value", {})
    if "stringValueStrindex" in value:
        return key, strings[value["stringValueStrindex"]]
    return key, any_value(value)


def profile_kernel_frames(requests: list[dict[str, Any]]) -> tuple[int, set[str]]:
    """From OTLP/JSON profile requests: how many locations are kernel frames
    (``profile.frame.type`` = kernel), and the function names of those that are named."""
    total, names = 0, set()
    for req in requests:
        d = req.get("dictionary", {})
        strings, funcs = d.get("stringTable", []), d.get("functionTable", [])
        attrs = d.get("attributeTable", [])

        for loc in d.get("locationTable", []):
            if dict(_decoded_kv(attrs[i], strings) for i in loc.get("attributeIndices", [])).get(
                    "profile.frame.type") != "kernel":
                continue
            total += 1
            for line in loc.get("lines", []):
                name = strings[funcs[line.get("functionIndex", 0)].get("nameStrindex", 0)]
                if name:
                    names.add(name)
    return total, names


def go_env(home: Path) -> dict[str, str]:
    """Environment for ``go tool pprof`` in tests: a throwaway HOME, and one build cache for the
    whole machine (the first use builds the pprof tool: minutes on a loaded 2-core runner; later
    ones reuse it)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ebpf-otlp-receiver" / "go-build"
    cache.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), "GOCACHE": str(cache), "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
