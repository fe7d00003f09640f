"""eBPF telemetry sidecar for the OpenTelemetry Collector, and its library API."""

from ._version import __version__
from .config import EbpfConfig
from .convert.converter import EbpfOtlpConverter
from .model import EbpfEvent, EbpfEventType, Signal

__all__ = ["__version__", "EbpfConfig", "EbpfEvent", "EbpfEventType", "EbpfOtlpConverter", "Signal"]
