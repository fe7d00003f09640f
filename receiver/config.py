"""Configuration: frozen dataclasses with every default in one place, loaded from YAML and the
standard OTEL_* environment variables, validated as a whole.

``EbpfConfig.load(path)`` returns a validated config or raises one ``ConfigError`` listing every
problem (unknown key, wrong type, bad duration/address/size, out-of-range value) with its key path.
Environment variables override the file, as they do for the OpenTelemetry SDKs' exporters.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .errors import ConfigError

__all__ = [
    "EbpfConfig",
    "ExporterConfig",
    "SignalExporterConfig",
    "RetryConfig",
    "TelemetryConfig",
    "ResourceConfig",
    "ProcessFilter",
    "SourcesConfig",
    "ProcessSourceConfig",
    "ProfilerSourceConfig",
    "NetworkSourceConfig",
    "SyscallsSourceConfig",
    "PROFILER_PRESETS",
    "parse_duration",
    "parse_size",
    "parse_address",
    "reference_table",
]


class _Kind:
    """Marker for ``Annotated`` fields whose text form needs parsing."""

    def __init__(self, name: str, form: str):
        self.name, self.form = name, form


DURATION = _Kind("duration", 'a duration such as "500ms", "10s", "5m" or a number of seconds')
SIZE = _Kind("size", 'a size such as "4MiB", "512KiB" or a number of bytes')
ADDRESS = _Kind("address", 'an address "host:port" with a port from 1 to 65535')
ENDPOINT = _Kind("endpoint", 'an endpoint "host:port" or a URL "http(s)://host[:port][/path]"')



@dataclass(frozen=True)
class Range:
    """A numeric field's limits, declared on the field (``Annotated[int, Range(1)]``): checked by
    ``validate()`` for every config, loaded or built in code, so a zero interval never reaches
    a loop."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False     # the bound itself is not allowed
    high_open: bool = False

    def allows(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def describe(self) -> str:
        lo = None if self.low is None else ("greater than " if self.low_open else "at least ") + f"{self.low:g}"
        hi = None if self.high is None else ("less than " if self.high_open else "at most ") + f"{self.high:g}"
        return " and ".join(x for x in (lo, hi) if x)


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)

Duration = Annotated[float, DURATION]
Size = Annotated[int, SIZE]
Address = Annotated[str, ADDRESS]
Endpoint = Annotated[str, ENDPOINT]

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024,
               "mib": 1024**2, "gib": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"1m30s"``, ``"10s"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:   # nan and inf are not durations
            raise ValueError
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise ValueError
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``"4MiB"``, ``"512KiB"``, ``"1MB"`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def parse_address(value: Any) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"`` or ``"[v6]:port"``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s\[\]]*):(\d+)", str(value).strip())
    if not m:
        raise ValueError
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError
    return host, port


def _check_address(value: Any) -> str:
    parse_address(value)
    return str(value).strip()


def _parse_endpoint(value: Any) -> str:
    """``host:port``, or an http/https URL (the port may then be left out; a path is kept for
    OTLP/HTTP)."""
    text = str(value).strip()
    m = re.fullmatch(r"(https?)://([^/?#]+)(/[^?#]*)?", text)
    if m is None:
        parse_address(text)
    elif not re.fullmatch(r"\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+", m.group(2)):
        parse_address(m.group(2))
    return text


_PARSERS = {"duration": parse_duration, "size": parse_size, "address": _check_address,
            "endpoint": _parse_endpoint}


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RetryConfig:
    """Exponential backoff with jitter, defaults as the Collector's ``configretry``."""

    enabled: bool = True
    initial_interval: Annotated[Duration, POSITIVE] = 5.0
    max_interval: Annotated[Duration, POSITIVE] = 30.0
    max_elapsed_time: Duration = 300.0
    multiplier: Annotated[float, AT_LEAST_1] = 1.5
    randomization_factor: Annotated[float, Range(0, 1, high_open=True)] = 0.5

    def _validate(self) -> list[str]:
        p = []
        if self.max_interval < self.initial_interval:
            p.append("max_interval: must be at least initial_interval")
        return p


OtlpProtocol = Literal["grpc", "http/protobuf", "http/json"]


class _DefaultEndpoint(str):
    """The endpoint nobody set: ``http://localhost:4317``, or ``…:4318`` for OTLP/HTTP (an
    endpoint read from a file or a variable is a plain ``str`` and is used as given)."""


@dataclass(frozen=True)
class SignalExporterConfig:
    """One signal's overrides of the exporter's settings (the OTEL_EXPORTER_OTLP_<SIGNAL>_*
    variables); what is unset is inherited. An ``endpoint`` here is used as is: for OTLP/HTTP
    the full URL, path included."""

    protocol: OtlpProtocol | None = None
    endpoint: Endpoint | None = None
    insecure: bool | None = None
    headers: dict[str, str] | None = None
    compression: Literal["gzip", "none"] | None = None
    timeout: Duration | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class ExporterConfig:
    """OTLP export to the Collector over gRPC (port 4317) or HTTP (``http/protobuf``,
    ``http/json``; port 4318). For OTLP/HTTP ``endpoint`` is a base URL to which
    ``/v1/traces`` etc. are appended. A scheme decides TLS (``http://`` is plaintext,
    ``https://`` is TLS); without a scheme, ``insecure`` does. Unset, the endpoint is
    ``http://localhost:4317`` for gRPC and ``http://localhost:4318`` for HTTP. ``traces``,
    ``metrics``, ``logs`` and ``profiles`` override settings for one signal. With
    ``disk_queue_directory`` set, batches wait on disk (at most ``disk_queue_max_bytes`` per
    signal) until sent, across restarts."""

    protocol: OtlpProtocol = "grpc"
    endpoint: Endpoint = _DefaultEndpoint("http://localhost:4317")  # noqa: RUF009 - immutable
    insecure: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    compression: Literal["gzip", "none"] = "gzip"
    timeout: Annotated[Duration, POSITIVE] = 10.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    max_batch_size: Annotated[int, AT_LEAST_1] = 512
    batch_timeout: Annotated[Duration, POSITIVE] = 1.0
    max_request_bytes: Size = 4 * 1024 * 1024
    queue_size: Annotated[int, AT_LEAST_1] = 20000
    disk_queue_directory: str | None = None
    disk_queue_max_bytes: Size = 256 * 1024 * 1024
    retry: RetryConfig = field(default_factory=RetryConfig)
    shutdown_timeout: Annotated[Duration, POSITIVE] = 10.0
    traces: SignalExporterConfig = field(default_factory=SignalExporterConfig)
    metrics: SignalExporterConfig = field(default_factory=SignalExporterConfig)
    logs: SignalExporterConfig = field(default_factory=SignalExporterConfig)
    profiles: SignalExporterConfig = field(default_factory=SignalExporterConfig)

    @property
    def effective_endpoint(self) -> str:
        """``endpoint``, or the protocol's default (4317 for gRPC, 4318 for HTTP)."""
        if isinstance(self.endpoint, _DefaultEndpoint) and self.protocol != "grpc":
            return "http://localhost:4318"
        return self.endpoint

    @property
    def target(self) -> str:
        """The ``host:port`` a gRPC channel dials (a URL's path is not used by gRPC)."""
        m = re.fullmatch(r"(https?)://([^/?#]+).*", self.effective_endpoint)
        if m is None:
            return self.effective_endpoint.rstrip("/")
        host = m.group(2)
        if not re.search(r":\d+$", host):
            host += ":443" if m.group(1) == "https" else ":80"
        return host

    @property
    def use_tls(self) -> bool:
        if self.effective_endpoint.startswith("https://"):
            return True
        if self.effective_endpoint.startswith("http://"):
            return False
        return not self.insecure

    def for_signal(self, signal: str) -> "ExporterConfig":
        """This config with ``signal``'s overrides applied (its endpoint still as given: the
        exporter adds the OTLP/HTTP path only to the shared endpoint)."""
        overrides = getattr(self, signal)
        changes = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)
                   if getattr(overrides, f.name) is not None}
        return dataclasses.replace(self, **changes)

    def _validate(self) -> list[str]:
        p = []
        if self.queue_size < self.max_batch_size:
            p.append("queue_size: must be at least max_batch_size")
        if self.max_request_bytes < 1024:
            p.append("max_request_bytes: must be at least 1KiB")
        for prefix, section in [("", self)] + [(f"{s}.", getattr(self, s))
                                               for s in ("traces", "metrics", "logs", "profiles")]:
            if (section.cert_file is None) != (section.key_file is None):
                p.append(f"{prefix}cert_file/key_file: give both for mTLS, or neither")
            if section.timeout is not None and section.timeout <= 0 and section is not self:
                p.append(f"{prefix}timeout: must be greater than 0")
            for name in ("ca_file", "cert_file", "key_file"):
                path = getattr(section, name)
                if path is not None and not Path(path).is_file():
                    p.append(f"{prefix}{name}: no such file: {path}")
        return p


@dataclass(frozen=True)
class TelemetryConfig:
    """The agent's own health: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.
    ``listen: 127.0.0.1:9464`` keeps it on this host; ``web_config_file`` adds TLS and basic
    auth, in the web config format of the Prometheus exporters (``tls_server_config``,
    ``basic_auth_users`` with bcrypt hashes). ``/readyz`` fails once export has been failing
    for longer than ``readiness_grace``."""

    enabled: bool = True
    listen: Address = "0.0.0.0:9464"
    web_config_file: str | None = None
    readiness_grace: Duration = 30.0

    def _validate(self) -> list[str]:
        p = []
        if self.web_config_file is not None:
            from .web_config import WebConfig

            try:   # checked with the rest of the config: `check` reports it too
                WebConfig.load(self.web_config_file)
            except ConfigError as e:
                p.extend(e.problems)
        return p


@dataclass(frozen=True)
class ResourceConfig:
    """Attributes added to every resource, after the detected host ones."""

    service_name: str = "ebpf-otlp-receiver"
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessFilter:
    """Which processes a source looks at; empty lists mean all. Applied in the kernel via maps.
    ``cgroups`` are cgroup v2 paths as /proc/PID/cgroup shows them (e.g.
    "/system.slice/docker-<id>.scope"), or full paths under the cgroup v2 mount."""

    pids: list[int] = field(default_factory=list)
    process_names: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.pids or self.process_names or self.cgroups)

    def _validate(self) -> list[str]:
        p = []
        if any(pid <= 0 for pid in self.pids):
            p.append("pids: process ids must be positive")
        if any(not 0 < len(n.encode()) <= 15 for n in self.process_names):
            p.append("process_names: names are kernel comm values, 1 to 15 bytes")
        return p


@dataclass(frozen=True)
class ProcessSourceConfig:
    """exec/exit/fork/OOM-kill events as logs. ``command_line`` may carry secrets: ``redacted``
    (default) masks values of secret-looking arguments, ``full`` sends argv as is, ``off`` omits it."""

    enabled: bool = True
    command_line: Literal["off", "redacted", "full"] = "redacted"
    fork_events: bool = True
    max_args: Annotated[int, Range(1, 64)] = 20

    def _validate(self) -> list[str]:
        return []


PROFILER_PRESETS = {"production": 19, "development": 99, "debug": 199}


@dataclass(frozen=True)
class ProfilerSourceConfig:
    """perf-event CPU sampling. ``frequency`` overrides the preset's; production allows 19–49 Hz."""

    enabled: bool = True
    preset: Literal["production", "development", "debug"] = "production"
    frequency: Annotated[int, Range(1, 1000)] | None = None
    report_interval: Annotated[Duration, AT_LEAST_1] = 10.0
    kernel_stacks: bool = True
    user_stacks: bool = True
    max_stacks: Annotated[int, Range(64)] = 16384
    symbol_cache_size: Annotated[int, AT_LEAST_1] = 256
    pprof_dir: str | None = None
    filter: ProcessFilter = field(default_factory=ProcessFilter)

    @property
    def sample_frequency(self) -> int:
        return self.frequency if self.frequency is not None else PROFILER_PRESETS[self.preset]

    def _validate(self) -> list[str]:
        p = []
        if self.frequency is not None:
            if self.preset == "production" and not 19 <= self.frequency <= 49:
                p.append("frequency: the production preset allows 19 to 49 Hz; "
                         "use preset development or debug for more")
        return p


@dataclass(frozen=True)
class NetworkSourceConfig:
    """TCP connection lifecycle as spans and metrics. ``ports`` selects connections by their
    server port (a client's peer port, a server's local port); ``addresses`` by the peer address
    or network. Peer address/port become metric attributes only with ``peer_attributes``;
    attribute sets beyond ``max_attribute_sets`` go to an overflow series
    (``otel.metric.overflow=true``)."""

    enabled: bool = True
    spans: bool = True
    metrics: bool = True
    report_interval: Annotated[Duration, POSITIVE] = 10.0
    min_span_duration: Duration = 0.0
    ports: list[int] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    filter: ProcessFilter = field(default_factory=ProcessFilter)
    peer_attributes: bool = False
    max_attribute_sets: Annotated[int, AT_LEAST_1] = 2000
    max_connections: Annotated[int, Range(16)] = 65536

    def _validate(self) -> list[str]:
        p = []
        if any(not 0 < port < 65536 for port in self.ports):
            p.append("ports: each port must be from 1 to 65535")
        import ipaddress

        for a in self.addresses:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                p.append(f"addresses: {a!r} is not an IP address or CIDR network")
        return p


# Calls that block by design (waiting is their job): slow, but not worth a span each.
SLOW_EXCLUDE_DEFAULT = ("futex", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
                        "select", "pselect6", "wait4", "waitid", "pause", "rt_sigsuspend",
                        "rt_sigtimedwait", "io_getevents", "io_pgetevents", "nanosleep",
                        "clock_nanosleep")


@dataclass(frozen=True)
class SyscallsSourceConfig:
    """In-kernel per-syscall counts, errors and latency histograms; calls slower than
    ``slow_threshold`` as spans, except those in ``slow_exclude`` (calls that block by design:
    they still count in the metrics). Per-process series only for processes the filter selects."""

    enabled: bool = True
    report_interval: Annotated[Duration, AT_LEAST_1] = 10.0
    slow_threshold: Annotated[Duration, POSITIVE] = 0.010
    slow_spans: bool = True
    slow_exclude: list[str] = field(default_factory=lambda: list(SLOW_EXCLUDE_DEFAULT))
    filter: ProcessFilter = field(default_factory=ProcessFilter)
    max_series: Annotated[int, AT_LEAST_1] = 2000

    def _validate(self) -> list[str]:
        p = []
        return p


@dataclass(frozen=True)
class SourcesConfig:
    process: ProcessSourceConfig = field(default_factory=ProcessSourceConfig)
    profiler: ProfilerSourceConfig = field(default_factory=ProfilerSourceConfig)
    network: NetworkSourceConfig = field(default_factory=NetworkSourceConfig)
    syscalls: SyscallsSourceConfig = field(default_factory=SyscallsSourceConfig)

    def enabled(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name).enabled]


@dataclass(frozen=True)
class EbpfConfig:
    """The whole agent's configuration (the library's ``EbpfConfig``)."""

    exporter: ExporterConfig = field(default_factory=ExporterConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    resource: ResourceConfig = field(default_factory=ResourceConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @classmethod
    def default(cls, environ: typing.Mapping[str, str] | None = None) -> "EbpfConfig":
        """The defaults with the OTEL_* variables applied, as ``load()`` without a file."""
        return cls.from_dict({}, environ)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None,
             environ: typing.Mapping[str, str] | None = None) -> "EbpfConfig":
        """Reads ``path`` (YAML; ``None`` for defaults), applies OTEL_* variables, validates."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                raw = Path(path).read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); "
                                  "a config file is YAML") from None
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
            except (ValueError, TypeError, OverflowError, RecursionError) as e:
                # YAML that parses but cannot be built (a timestamp like 2001-13-45, nesting
                # deeper than the stack): still a problem with the file, not a crash.
                raise ConfigError(f"{path}: not valid YAML: {type(e).__name__}: {e}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
            data = loaded
        return cls.from_dict(data, environ)

    @classmethod
    def from_dict(cls, data: dict[str, Any],
                  environ: typing.Mapping[str, str] | None = None) -> "EbpfConfig":
        problems: list[str] = []
        data = _apply_environment(data, os.environ if environ is None else environ, problems)
        config = _build(cls, data, "", problems)
        problems.extend(config.problems())   # limits too, so every problem is named at once
        if problems:
            raise ConfigError(problems)
        return config

    def problems(self) -> list[str]:
        """Every problem of this config, each with its key path (empty: valid)."""
        return _problems(self)

    def validate(self) -> "EbpfConfig":
        """Raises one ``ConfigError`` listing every problem; for configs built in code as much
        as for loaded ones (``load()`` and ``from_dict()`` call it)."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


# --------------------------------------------------------------------------- environment


def _parse_kv_list(text: str) -> dict[str, str]:
    """W3C-baggage-like ``k=v,k2=v2`` (values URL-encoded), as OTEL_* list variables use."""
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(item)
        k, v = item.split("=", 1)
        out[urllib.parse.unquote(k.strip())] = urllib.parse.unquote(v.strip())
    return out


def _apply_exporter_environment(exporter: dict[str, Any], env: typing.Mapping[str, str], prefix: str,
                                problems: list[str], merge_headers: bool = True) -> None:
    """``<prefix>ENDPOINT``, ``PROTOCOL``, ``HEADERS``, ``TIMEOUT`` (ms), ``COMPRESSION``,
    ``INSECURE``, ``CERTIFICATE``, ``CLIENT_CERTIFICATE``, ``CLIENT_KEY`` into ``exporter``."""
    simple = {"ENDPOINT": "endpoint", "PROTOCOL": "protocol", "CERTIFICATE": "ca_file",
              "CLIENT_CERTIFICATE": "cert_file", "CLIENT_KEY": "key_file",
              "COMPRESSION": "compression"}
    for var, key in simple.items():
        if env.get(prefix + var):
            exporter[key] = env[prefix + var].strip()
    if env.get(prefix + "INSECURE"):
        exporter["insecure"] = env[prefix + "INSECURE"].strip().lower() == "true"
    if env.get(prefix + "TIMEOUT"):
        try:
            ms = float(env[prefix + "TIMEOUT"])
            if not 0 < ms < float("inf"):
                raise ValueError
            exporter["timeout"] = ms / 1000.0
        except ValueError:
            problems.append(f"{prefix}TIMEOUT: expected a positive number of milliseconds")
    if env.get(prefix + "HEADERS"):
        try:
            headers = _parse_kv_list(env[prefix + "HEADERS"])
            exporter["headers"] = {**(exporter.get("headers") or {}), **headers} if merge_headers else headers
        except ValueError:
            problems.append(f"{prefix}HEADERS: expected key=value pairs separated by commas")


def _apply_environment(data: dict[str, Any], env: typing.Mapping[str, str],
                       problems: list[str]) -> dict[str, Any]:
    data = dict(data)
    exporter = dict(data.get("exporter") or {}) if isinstance(data.get("exporter", {}), dict) else data.get("exporter")
    resource = dict(data.get("resource") or {}) if isinstance(data.get("resource", {}), dict) else data.get("resource")
    if isinstance(exporter, dict):
        _apply_exporter_environment(exporter, env, "OTEL_EXPORTER_OTLP_", problems)
        # Per-signal variables, as the specification names them (PROFILES beside the three).
        for signal in ("traces", "metrics", "logs", "profiles"):
            section = exporter.get(signal) or {}
            if isinstance(section, dict):
                section = dict(section)
                _apply_exporter_environment(section, env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_",
                                            problems, merge_headers=False)
                if section:
                    exporter[signal] = section
        data["exporter"] = exporter
    if isinstance(resource, dict):
        if env.get("OTEL_RESOURCE_ATTRIBUTES"):
            try:
                resource["attributes"] = {**(resource.get("attributes") or {}),
                                          **_parse_kv_list(env["OTEL_RESOURCE_ATTRIBUTES"])}
            except ValueError:
                problems.append("OTEL_RESOURCE_ATTRIBUTES: expected key=value pairs separated by commas")
        if env.get("OTEL_SERVICE_NAME"):
            resource["service_name"] = env["OTEL_SERVICE_NAME"]
        data["resource"] = resource
    return data


# --------------------------------------------------------------------------- typed building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        kind = next((m for m in meta if isinstance(m, _Kind)), None)
        name = kind.form if kind else _type_name(base)
        limits = [m.describe() for m in meta if isinstance(m, Range)]
        return name + (f" ({', '.join(limits)})" if limits else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of strings to strings"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    bad = object()
    result: Any = bad
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        kind = next((m for m in meta if isinstance(m, _Kind)), None)
        if kind is None:
            return _convert(base, value, key, problems)   # limits are checked by validate()
        try:
            result = _PARSERS[kind.name](value)
        except (ValueError, TypeError):
            pass
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        sub: list[str] = []
        result = _convert(args[0], value, key, sub)
        if sub:
            problems.extend(sub)
            return None
        return result
    elif origin is Literal:
        if value in typing.get_args(tp):
            result = value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            result = {k: str(v) for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".", problems)
    elif tp is bool:
        if isinstance(value, bool):
            result = value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            result = value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if math.isfinite(value):   # nan and inf (.nan, .inf in YAML) are not settings
                    result = float(value)
            except OverflowError:
                pass
    elif tp is str:
        if isinstance(value, str):
            result = value
    if result is bad:
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    return result


def _build(cls: Any, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(data) - names, key=str):  # YAML keys may be numbers, dates, ...
        problems.append(f"{prefix}{unknown}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(data):
        before = len(problems)
        value = _convert(hints[name], data[name], prefix + name, problems)
        # A bad field keeps its default (the caller raises anyway); a section keeps its good
        # fields, so their limits are checked too and every problem is named at once.
        if len(problems) == before or dataclasses.is_dataclass(value):
            kwargs[name] = value
    return cls(**kwargs)


def _problems(obj: Any, prefix: str = "") -> list[str]:
    """Every problem of a config section and its subsections: declared field limits first, then
    the section's own cross-field rules (``_validate``)."""
    out = []
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_problems(value, f"{prefix}{f.name}."))
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None or typing.get_origin(tp) is not Annotated:
            continue
        for limit in (m for m in typing.get_args(tp)[1:] if isinstance(m, Range)):
            if not limit.allows(value):
                out.append(f"{prefix}{f.name}: must be {limit.describe()}, got {value!r}")
    own = getattr(obj, "_validate", None)
    if own is not None:
        out.extend(prefix + p for p in own())
    return out


def reference_table(cls: Any = EbpfConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, expected form, default) for every leaf key: the README's reference comes from this."""
    rows = []
    hints = typing.get_type_hints(cls, include_extras=True)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference_table(tp, f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, _type_name(tp), repr(getattr(default, f.name))))
    return rows
