"""Configuration: ``schema`` (frozen dataclasses, defaults, declared limits, ``validate()``),
``loader`` (YAML files and the OTEL_* variables, typed building), ``forms`` (durations, sizes,
addresses, endpoints, ``Range``).

``EbpfConfig.load(path)`` returns a validated config or raises one ``ConfigError`` listing every
problem (unknown key, wrong type, bad duration/address/size, out-of-range value) with its key path.
Environment variables override the file, as they do for the OpenTelemetry SDKs' exporters.
"""

from .forms import Range, parse_address, parse_duration, parse_size
from .schema import (
    PROFILER_PRESETS,
    CachesConfig,
    EbpfConfig,
    ExporterConfig,
    NetworkSourceConfig,
    OtlpProtocol,
    ProcessFilter,
    ProcessSourceConfig,
    ProfilerSourceConfig,
    ResourceConfig,
    RetryConfig,
    SignalExporterConfig,
    SourcesConfig,
    SyscallsSourceConfig,
    TelemetryConfig,
    reference_table,
)

__all__ = ["EbpfConfig", "ExporterConfig", "SignalExporterConfig", "OtlpProtocol", "RetryConfig",
           "TelemetryConfig", "ResourceConfig", "ProcessFilter", "SourcesConfig", "ProcessSourceConfig",
           "ProfilerSourceConfig", "NetworkSourceConfig", "SyscallsSourceConfig", "CachesConfig", "PROFILER_PRESETS",
           "Range", "parse_duration", "parse_size", "parse_address", "reference_table"]
