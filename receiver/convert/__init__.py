"""Conversion of kernel observations to OTLP messages."""

from .converter import EbpfOtlpConverter

__all__ = ["EbpfOtlpConverter"]
