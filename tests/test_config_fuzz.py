"""Any input to the config loader and the OTEL_* variables: a config or one ``ConfigError`` with
a message (exit 2 from the CLI), never a traceback. Fuzzed with Hypothesis, bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.config import EbpfConfig
from receiver.errors import ConfigError

from .harness import REPO, examples

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-m", "receiver", *args], capture_output=True, text=True,
                          cwd=REPO, env={**base, **(env or {})}, timeout=60, check=False)


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_config_of_random_bytes_is_one_message_and_exit_2(command: str, tmp_path: Path) -> None:
    f = tmp_path / "random.yaml"
    f.write_bytes(bytes(range(256)) * 4 + os.urandom(1024))
    p = run_cli(command, "--config", str(f))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert "not UTF-8 text" in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 3, p.stderr


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "-5", "0", "1e400"])
@pytest.mark.parametrize("command", ["run", "check"])
def test_otlp_timeout_must_be_a_finite_positive_number(command: str, value: str) -> None:
    p = run_cli(command, env={"OTEL_EXPORTER_OTLP_TIMEOUT": value})
    assert p.returncode == 2, (value, p.stderr)
    assert "OTEL_EXPORTER_OTLP_TIMEOUT" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("text", ["exporter:\n  timeout: .nan\n", "exporter:\n  timeout: .inf\n",
                                  "exporter:\n  retry:\n    multiplier: .nan\n",
                                  "exporter:\n  batch_timeout: 1e400\n",
                                  "exporter:\n  timeout: " + "9" * 400 + "h\n"])
def test_non_finite_numbers_in_the_file_are_rejected(text: str, tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError):
        EbpfConfig.load(f, environ={})


def _load_or_config_error(path: Path, environ: dict[str, str]) -> None:
    try:
        EbpfConfig.load(path, environ=environ)
    except ConfigError as e:
        assert str(e).strip()


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_any_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    f = tmp_path_factory.mktemp("fz") / "c.yaml"
    f.write_bytes(data)
    _load_or_config_error(f, {})


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                     st.text(max_size=30), st.sampled_from(["10s", "4MiB", "1.2.3.4:5", "http://x:1",
                                                            "redacted", "gzip", "-1", ".nan"]))
_keys = st.one_of(st.sampled_from(["exporter", "telemetry", "resource", "sources", "log_level",
                                   "process", "profiler", "network", "syscalls", "endpoint",
                                   "timeout", "retry", "filter", "pids", "enabled", "listen",
                                   "headers", "attributes", "ports", "addresses", "web_config_file",
                                   "readiness_grace", "max_args", "frequency", "preset"]),
                  st.text(max_size=8), st.integers())
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)


@FUZZ
@given(st.dictionaries(_keys, _values, max_size=6))
def test_fuzz_any_yaml_structure(tmp_path_factory: pytest.TempPathFactory, doc: dict) -> None:
    f = tmp_path_factory.mktemp("fz") / "c.yaml"
    f.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load_or_config_error(f, {})


_OTEL = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_CERTIFICATE",
         "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_KEY",
         "OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TIMEOUT",
         "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME"]
_env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@FUZZ
@given(st.dictionaries(st.sampled_from(_OTEL), st.one_of(
    _env_text, st.sampled_from(["nan", "inf", "-1", "1e999", "a=b,c", "%zz=%", "=", ",,", "true"])),
    max_size=5))
def test_fuzz_otel_environment(environ: dict[str, str]) -> None:
    try:
        EbpfConfig.load(None, environ=environ)
    except ConfigError as e:
        assert str(e).strip()


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_any_yaml_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    f = tmp_path_factory.mktemp("fz") / "c.yaml"
    f.write_text(text, errors="surrogatepass")
    _load_or_config_error(f, {})
