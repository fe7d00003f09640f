"""eBPF telemetry sidecar for the OpenTelemetry Collector, and its library API.

The API's names are imported on first use (PEP 562): ``python -m receiver profile`` or ``check``
does not pay for gRPC, the exporter and the converters at start-up."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ConfigError, ConversionError, ExportError, ReceiverError, SourceUnavailableError

if TYPE_CHECKING:
    from .config import EbpfConfig
    from .convert.converter import EbpfOtlpConverter
    from .export.send import send, send_async
    from .model import EbpfEvent, EbpfEventType, Signal
    from .profiling.cpu_profiler import EbpfCpuProfiler

__all__ = ["__version__", "EbpfConfig", "EbpfCpuProfiler", "EbpfEvent", "EbpfEventType",
           "EbpfOtlpConverter", "Signal", "send", "send_async", "ReceiverError", "ConfigError",
           "ConversionError", "ExportError", "SourceUnavailableError"]

_LAZY = {"EbpfConfig": ".config", "EbpfOtlpConverter": ".convert.converter", "send": ".export.send",
         "send_async": ".export.send", "EbpfEvent": ".model", "EbpfEventType": ".model", "Signal": ".model",
         "EbpfCpuProfiler": ".profiling.cpu_profiler"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
