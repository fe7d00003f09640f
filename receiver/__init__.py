"""eBPF telemetry sidecar for the OpenTelemetry Collector, and its library API."""

from ._version import __version__
from .config import EbpfConfig
from .convert.converter import EbpfOtlpConverter
from .errors import ConfigError, ConversionError, ExportError, ReceiverError, SourceUnavailableError
from .export.send import send, send_async
from .model import EbpfEvent, EbpfEventType, Signal
from .profiling.cpu_profiler import EbpfCpuProfiler

__all__ = ["__version__", "EbpfConfig", "EbpfCpuProfiler", "EbpfEvent", "EbpfEventType",
           "EbpfOtlpConverter", "Signal", "send", "send_async", "ReceiverError", "ConfigError",
           "ConversionError", "ExportError", "SourceUnavailableError"]
