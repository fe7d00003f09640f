"""The configuration's schema: frozen dataclasses with every default and every limit in one
place, validated as a whole (``validate()``); reading files and the environment is ``loader``'s.

``EbpfConfig.load(path)`` returns a validated config or raises one ``ConfigError`` listing every
problem (unknown key, wrong type, bad duration/address/size, out-of-range value) with its key path.
Environment variables override the file, as they do for the OpenTelemetry SDKs' exporters.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from ..errors import ConfigError
from . import loader
from .forms import (
    AT_LEAST_1,
    POSITIVE,
    Address,
    Duration,
    Endpoint,
    Range,
    Size,
    field_problems,
    parse_address,
    parse_duration,
    parse_size,
    type_name,
)

__all__ = [
    "EbpfConfig",
    "ExporterConfig",
    "SignalExporterConfig",
    "RetryConfig",
    "TelemetryConfig",
    "ResourceConfig",
    "ProcessFilter",
    "OffCpuConfig",
    "SourcesConfig",
    "ProcessSourceConfig",
    "ProfilerSourceConfig",
    "NetworkSourceConfig",
    "SyscallsSourceConfig",
    "HttpSourceConfig",
    "CachesConfig",
    "BpfConfig",
    "PROFILER_PRESETS",
    "parse_duration",
    "parse_size",
    "parse_address",
    "reference_table",
]




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
            from ..web_config import WebConfig

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
    (default) masks values of secret-looking arguments, ``full`` sends argv as is, ``off`` omits it.
    ``max_args``: arguments exported, at most the 20 the kernel side captures (``PROC_MAX_ARGS``
    in bpf/process.h). ``max_inflight_execs``: execs whose argv the kernel side holds at once,
    between the exec's entry and its success or failure (2.5 KiB each); an exec beyond it is
    still sent, without its arguments, and counted lost (``args_map_full``).
    ``max_tracked_exits``: processes whose exit code or fatal signal the kernel side holds at
    once, from exit_group(2) or the signal until the process is gone; an exit beyond it is sent
    without its code and counted lost (``exit_map_full``)."""

    enabled: bool = True
    command_line: Literal["off", "redacted", "full"] = "redacted"
    fork_events: bool = True
    max_args: Annotated[int, Range(1, 20)] = 20      # high: PROC_MAX_ARGS (a test holds them equal)
    max_inflight_execs: Annotated[int, Range(1, 65536)] = 4096
    max_tracked_exits: Annotated[int, Range(1, 1 << 20)] = 16384

    def _validate(self) -> list[str]:
        return []


PROFILER_PRESETS = {"production": 19, "development": 99, "debug": 199}


@dataclass(frozen=True)
class OffCpuConfig:
    """Off-CPU time (docs/profiler.md#off-cpu-time): where threads wait, weighted by the
    nanoseconds until they ran again. A switch-out is recorded with ``sample_probability``; a
    block is counted when it lasted at least ``min_block``; reported times are divided by the
    probability, so they estimate the true blocked time."""

    enabled: bool = False
    min_block: Duration = 0.0
    sample_probability: Annotated[float, Range(0, 1, low_open=True)] = 0.1
    max_threads: Annotated[int, Range(64, 1 << 20)] = 4096     # ~3 KiB each, kernel memory
    max_stacks: Annotated[int, Range(64, 1 << 20)] = 4096      # per generation, ~3 KiB each

    def _validate(self) -> list[str]:
        if not 0 <= self.min_block <= 4000:
            return ["min_block: must be from 0 to 4000 seconds"]
        return []


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
    # User stacks walked in the kernel with tables made from each binary's .eh_frame (code built
    # without frame pointers); off: the kernel's frame-pointer walk only.
    unwind_tables: bool = True
    unwind_table_rows: Annotated[int, Range(4096, 1 << 24)] = 1 << 21   # 16 bytes each: 32 MiB
    unwind_processes: Annotated[int, Range(16, 65536)] = 1024           # 2 KiB each
    # CPython frames (function, file, line) in user stacks of Python processes; needs
    # unwind_tables (the Python walk follows the native one).
    python_frames: bool = True
    # Java (HotSpot) frames in user stacks of JVM processes; needs unwind_tables.
    java_frames: bool = True
    # Samples of a thread serving an HTTP request (seen by sources.http) carry a link to that
    # request's SERVER span (docs/profiler.md#request-links); needs sources.http.
    request_links: bool = False
    # The share of requests whose samples are linked (each linked request's samples are their own
    # samples, so a profile has up to one sample per stack per linked request).
    request_links_probability: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    # Samples of a thread with no link of ours link to the trace and span OBI keeps for it in
    # <bpf.pin_path>/otel/traces_ctx_v1 (created and pinned if absent; docs/profiler.md#request-links).
    traces_ctx_read: bool = False
    # Samples of a thread with no other link link to the trace and span of its OTEP 4947 record
    # (otel_thread_ctx_v1 TLS, found through glibc's thread_db descriptors; docs/profiler.md#request-links).
    thread_ctx_read: bool = False
    pprof_dir: str | None = None
    filter: ProcessFilter = field(default_factory=ProcessFilter)
    off_cpu: OffCpuConfig = field(default_factory=OffCpuConfig)

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



def _ring_and_ports_problems(ring_buffer_pages: int, ports: list[int]) -> list[str]:
    """The checks the network and http sources share: a ring of a power of two pages, TCP ports."""
    p = []
    if ring_buffer_pages & (ring_buffer_pages - 1):
        p.append("ring_buffer_pages: must be a power of two")
    if any(not 0 < port < 65536 for port in ports):
        p.append("ports: each port must be from 1 to 65535")
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
    # Finished connections wait here while the event loop is busy: 4 MiB holds 32 768 records
    # (128 bytes each), 3.3 s of 10 000 connection ends per second. Resident twice (the kernel
    # maps the data area twice), so 4 MiB costs 8 MB of RSS. Losses: ringbuf_full.
    ring_buffer_pages: Annotated[int, Range(1, 1 << 18)] = 1024

    def _validate(self) -> list[str]:
        p = _ring_and_ports_problems(self.ring_buffer_pages, self.ports)
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
    they still count in the metrics). Per-process series only for processes the filter selects.
    ``max_threads``: on kernels without task local storage (before 5.11), threads whose call is in
    flight while they are switched out, held at once in a hash by thread id (freed at the call's
    return or the thread's exit); a call beyond it is not measured and counted lost
    (``start_map_full``). Unused where task local storage exists (no limit there)."""

    enabled: bool = True
    report_interval: Annotated[Duration, AT_LEAST_1] = 10.0
    slow_threshold: Annotated[Duration, POSITIVE] = 0.010
    slow_spans: bool = True
    slow_exclude: list[str] = field(default_factory=lambda: list(SLOW_EXCLUDE_DEFAULT))
    filter: ProcessFilter = field(default_factory=ProcessFilter)
    max_series: Annotated[int, AT_LEAST_1] = 2000
    max_threads: Annotated[int, Range(1, 1 << 22)] = 32768

    def _validate(self) -> list[str]:
        p = []
        return p


@dataclass(frozen=True)
class HttpSourceConfig:
    """HTTP/1.x requests over plaintext TCP as spans and RED metrics, parsed from the first
    ``capture_bytes`` of each read/write on a TCP socket, copied in the kernel. Off by default:
    it reads the traffic of every selected process (only the request line, the status line and
    three framing/trace headers are kept). ``ports`` selects connections by their server port;
    empty, every socket whose bytes start like HTTP/1. Heads beyond ``max_header_bytes`` are
    counted as unparsed; metric attribute sets beyond ``max_attribute_sets`` go to an overflow
    series (``otel.metric.overflow=true``). ``max_calls``: slots for the read/write-family calls
    of selected processes in flight, from their entry to their return, one per thread id modulo
    ``max_calls``; a call whose slot another thread's call holds is not captured and counted lost
    (``call_map_full``), and its connection resynchronises. ``keep_sys_admin_for_tls``: keep
    CAP_SYS_ADMIN after start (when the agent has it) so that TLS uprobes attach to a libssl
    first mapped later (a new container's own); off, CAP_SYS_ADMIN is dropped and only the
    libssl files mapped at start are probed."""

    enabled: bool = False
    spans: bool = True
    metrics: bool = True
    report_interval: Annotated[Duration, POSITIVE] = 10.0
    ports: list[int] = field(default_factory=list)
    filter: ProcessFilter = field(default_factory=ProcessFilter)
    keep_sys_admin_for_tls: bool = False
    capture_bytes: Annotated[int, Range(64, 8192)] = 1024
    max_header_bytes: Annotated[int, Range(256, 1 << 20)] = 16384
    max_connections: Annotated[int, Range(16, 1 << 20)] = 65536
    max_calls: Annotated[int, Range(1, 1 << 20)] = 65536
    max_attribute_sets: Annotated[int, AT_LEAST_1] = 2000
    # 4 MiB: about 3 600 records of a full 1 KiB capture; losses: ringbuf_full.
    ring_buffer_pages: Annotated[int, Range(1, 1 << 18)] = 1024
    # Writes each server span's trace and span id for its serving thread into OBI's
    # <bpf.pin_path>/otel/traces_ctx_v1 until the response, for the OpenTelemetry eBPF profiler
    # (docs/profiler.md#request-links); not where OBI instruments the same processes.
    traces_ctx_write: bool = False

    def _validate(self) -> list[str]:
        return _ring_and_ports_problems(self.ring_buffer_pages, self.ports)


_CACHE_BOUND = Range(16, 1 << 24)


@dataclass(frozen=True)
class CachesConfig:
    """Bounds of the user-space caches that grow with the host and have no key of their own
    elsewhere (entries; the least recently used go first). Each is reported as
    ``ebpf_receiver_cache_entries{cache=KEY}`` with its limit and evictions."""

    process_resources: Annotated[int, _CACHE_BOUND] = 4096   # pid → OTLP resource
    cgroups: Annotated[int, _CACHE_BOUND] = 8192             # cgroup id → path (container.id)
    process_pids: Annotated[int, _CACHE_BOUND] = 16384       # process source: pid → parent, comm
    symbol_processes: Annotated[int, _CACHE_BOUND] = 4096    # profiler: mappings per process
    symbol_frames: Annotated[int, _CACHE_BOUND] = 65536      # profiler: address → named frame
    demangled_names: Annotated[int, _CACHE_BOUND] = 65536    # profiler: C++/Rust names
    python_codes: Annotated[int, _CACHE_BOUND] = 16384       # profiler: CPython code objects


@dataclass(frozen=True)
class BpfConfig:
    """Loading the BPF programs (docs/operations.md#start-up-and-the-compile-cache):
    ``cache_dir`` keeps what BCC compiled, per program, configuration and kernel, so a restart
    loads without compiling (null or "": no cache); ``kernel_headers`` is the header tree BCC
    compiles against (null: the running kernel's under /lib/modules, else the generic
    linux-headers-* under /usr/src the image and ``make setup`` install). Nothing is written
    outside ``cache_dir`` but the bpffs pins of request links under ``pin_path`` (OBI's
    ``$PINPATH``: both must name the same directory for ``traces_ctx_v1``)."""

    cache_dir: str | None = "/var/cache/ebpf-otlp-receiver"
    kernel_headers: str | None = None
    pin_path: str = "/sys/fs/bpf"

    def _validate(self) -> list[str]:
        p = []
        if self.cache_dir and not os.path.isabs(self.cache_dir):
            p.append(f"cache_dir: must be an absolute path, not {self.cache_dir!r}")
        if not os.path.isabs(self.pin_path):
            p.append(f"pin_path: must be an absolute path, not {self.pin_path!r}")
        if self.kernel_headers is not None and not os.path.isdir(os.path.join(self.kernel_headers, "include")):
            p.append(f"kernel_headers: no header tree at {self.kernel_headers} (it has no include/)")
        return p


@dataclass(frozen=True)
class SourcesConfig:
    process: ProcessSourceConfig = field(default_factory=ProcessSourceConfig)
    profiler: ProfilerSourceConfig = field(default_factory=ProfilerSourceConfig)
    network: NetworkSourceConfig = field(default_factory=NetworkSourceConfig)
    syscalls: SyscallsSourceConfig = field(default_factory=SyscallsSourceConfig)
    http: HttpSourceConfig = field(default_factory=HttpSourceConfig)

    def enabled(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name).enabled]


@dataclass(frozen=True)
class EbpfConfig:
    """The whole agent's configuration (the library's ``EbpfConfig``)."""

    exporter: ExporterConfig = field(default_factory=ExporterConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    resource: ResourceConfig = field(default_factory=ResourceConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    caches: CachesConfig = field(default_factory=CachesConfig)
    bpf: BpfConfig = field(default_factory=BpfConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @classmethod
    def default(cls, environ: typing.Mapping[str, str] | None = None) -> "EbpfConfig":
        """The defaults with the OTEL_* variables applied, as ``load()`` without a file."""
        return cls.from_dict({}, environ)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None,
             environ: typing.Mapping[str, str] | None = None) -> "EbpfConfig":
        """Reads ``path`` (YAML; ``None`` for defaults), applies OTEL_* variables, validates."""
        return cls.from_dict(loader.read_yaml(path) if path is not None else {}, environ)

    @classmethod
    def from_dict(cls, data: dict[str, Any],
                  environ: typing.Mapping[str, str] | None = None) -> "EbpfConfig":
        problems: list[str] = []
        data = loader.apply_environment(data, os.environ if environ is None else environ, problems)
        config = loader.build(cls, data, "", problems)
        problems.extend(config.problems())   # limits too, so every problem is named at once
        if problems:
            raise ConfigError(problems)
        return config

    def problems(self) -> list[str]:
        """Every problem of this config, each with its key path (empty: valid)."""
        return field_problems(self)

    def validate(self) -> "EbpfConfig":
        """Raises one ``ConfigError`` listing every problem; for configs built in code as much
        as for loaded ones (``load()`` and ``from_dict()`` call it)."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self



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
            rows.append((prefix + f.name, type_name(tp), repr(getattr(default, f.name))))
    return rows
