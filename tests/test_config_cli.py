"""Config loading and the CLI's answers to bad input: one clear message, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from receiver.config import EbpfConfig, parse_duration, parse_size
from receiver.errors import ConfigError

from .harness import REPO


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "receiver", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)


def test_defaults_are_valid() -> None:
    c = EbpfConfig.load(None, environ={})
    assert c.exporter.endpoint == "http://localhost:4317"
    assert c.exporter.use_tls is False
    assert c.telemetry.listen == "0.0.0.0:9464"
    assert c.sources.profiler.sample_frequency == 19
    assert c.exporter.max_request_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("10s", 10), ("1m30s", 90), (3, 3.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_sizes() -> None:
    assert parse_size("4MiB") == 4 * 1024 * 1024
    assert parse_size("1KB") == 1000


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("exporter:\n  endpoint: 'nohostport'\n  timeout: soon\n  bogus: 1\n"
                 "telemetry:\n  listen: ':99999'\n"
                 "sources:\n  profiler:\n    frequency: 5000\n  syscalls:\n    enabled: 'yes'\n")
    with pytest.raises(ConfigError) as e:
        EbpfConfig.load(f, environ={})
    text = str(e.value)
    for needle in ("exporter.endpoint", "exporter.timeout: expected a duration", "exporter.bogus: unknown key",
                   "telemetry.listen", "sources.profiler.frequency",
                   "sources.syscalls.enabled: expected true or false"):
        assert needle in text, (needle, text)


def test_production_preset_limits_frequency() -> None:
    with pytest.raises(ConfigError, match="production preset allows 19 to 49"):
        EbpfConfig.from_dict({"sources": {"profiler": {"frequency": 99}}}, environ={})
    c = EbpfConfig.from_dict({"sources": {"profiler": {"frequency": 49}}}, environ={})
    assert c.sources.profiler.sample_frequency == 49
    c = EbpfConfig.from_dict({"sources": {"profiler": {"preset": "debug"}}}, environ={})
    assert c.sources.profiler.sample_frequency == 199


def test_standard_environment_variables_override_the_file() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://gw.example:4317",
           "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-tenant=t1",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod,team=sre",
           "OTEL_SERVICE_NAME": "node-agent"}
    c = EbpfConfig.from_dict({"exporter": {"endpoint": "http://localhost:4317"}}, environ=env)
    assert c.exporter.target == "gw.example:4317" and c.exporter.use_tls
    assert c.exporter.headers == {"authorization": "Bearer abc", "x-tenant": "t1"}
    assert c.resource.attributes == {"deployment.environment.name": "prod", "team": "sre"}
    assert c.resource.service_name == "node-agent"


def test_bad_config_file_exits_2_without_traceback(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("exporter:\n  compression: zstd\n")
    r = run_cli("run", "--config", str(f))
    assert r.returncode == 2
    assert "exporter.compression: expected one of 'gzip', 'none'" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config_file_and_bad_yaml(tmp_path: Path) -> None:
    r = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "cannot read config file" in r.stderr and "Traceback" not in r.stderr
    f = tmp_path / "broken.yaml"
    f.write_text("exporter: [\n")
    r = run_cli("check", "--config", str(f))
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def test_version_and_help() -> None:
    from receiver import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "check" in r.stdout and "run" in r.stdout


def test_check_reports_each_requirement(bpf_ok: None, tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("sources:\n  process: {enabled: true}\n  profiler: {enabled: false}\n"
                 "  network: {enabled: false}\n  syscalls: {enabled: false}\n")
    r = run_cli("check", "--config", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ("CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG", "bpf() syscall", "tracefs mounted",
                "tracepoint sched:sched_process_exec", "BCC Python module", "kernel headers"):
        assert row in r.stdout, row


def test_check_fails_for_a_missing_tracepoint(bpf_ok: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from receiver import preflight
    from receiver.sources.base import Requirement
    from receiver.sources.process import ProcessSource

    monkeypatch.setattr(ProcessSource, "requirements",
                        classmethod(lambda cls, cfg: [Requirement("tracepoint", "nosuch:event")]))
    rows = preflight.run_checks(EbpfConfig.from_dict(
        {"sources": {n: {"enabled": n == "process"} for n in ("process", "profiler", "network", "syscalls")}},
        environ={}))
    row = next(r for r in rows if r.requirement == "tracepoint nosuch:event")
    assert not row.ok and row.needed_by == ("process",)


def test_bpf_sources_are_found() -> None:
    from receiver.kernel.bcc import bpf_source_dir

    assert (bpf_source_dir() / "process.bpf.c").is_file()


@pytest.mark.parametrize(("section", "problem"), [
    ({"sources": {"network": {"report_interval": 0}}}, "sources.network.report_interval: must be greater than 0"),
    ({"exporter": {"batch_timeout": "0s"}}, "exporter.batch_timeout: must be greater than 0"),
    ({"exporter": {"shutdown_timeout": 0}}, "exporter.shutdown_timeout: must be greater than 0"),
    ({"sources": {"syscalls": {"slow_threshold": 0}}}, "sources.syscalls.slow_threshold: must be greater than 0"),
    ({"exporter": {"retry": {"randomization_factor": 1}}},
     "exporter.retry.randomization_factor: must be at least 0 and less than 1"),
    ({"sources": {"profiler": {"preset": "debug", "frequency": 0}}},
     "sources.profiler.frequency: must be at least 1 and at most 1000"),
    ({"sources": {"network": {"ring_buffer_pages": 3}}}, "sources.network.ring_buffer_pages: must be a power of two"),
])
def test_limits_declared_on_fields_reject_zero_and_out_of_range(section: dict, problem: str) -> None:
    """A zero interval or timeout never reaches a loop: the limit is on the field."""
    with pytest.raises(ConfigError) as e:
        EbpfConfig.from_dict(section, environ={})
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_validate_is_public_and_checks_configs_built_in_code() -> None:
    from receiver.config import ExporterConfig, NetworkSourceConfig, SourcesConfig

    config = EbpfConfig(exporter=ExporterConfig(batch_timeout=0.0),
                        sources=SourcesConfig(network=NetworkSourceConfig(report_interval=-1.0)))
    assert config.problems() == ["exporter.batch_timeout: must be greater than 0, got 0.0",
                                 "sources.network.report_interval: must be greater than 0, got -1.0"]
    with pytest.raises(ConfigError):
        config.validate()
    assert EbpfConfig.default().validate().problems() == []
