"""Exceptions of the receiver.

    ReceiverError
    ├── ConfigError            bad configuration; the CLI prints it and exits 2
    ├── SourceUnavailableError a source cannot run on this host (missing privilege, kernel
    │                          feature, tracepoint, BCC); that source is disabled, the rest run
    ├── ConversionError        an EbpfEvent that cannot be converted (wrong type, missing or
    │                          out-of-range value, end before start)
    └── ExportError            an export request failed
        ├── PermanentExportError   not retryable (e.g. INVALID_ARGUMENT): data dropped, counted
        └── RetryableExportError   retryable (e.g. UNAVAILABLE); carries the server's retry delay
"""

from __future__ import annotations

__all__ = [
    "ReceiverError",
    "ConfigError",
    "SourceUnavailableError",
    "ConversionError",
    "ExportError",
    "PermanentExportError",
    "RetryableExportError",
]


class ReceiverError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ReceiverError):
    """Configuration problems; ``problems`` lists every one found, not only the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class SourceUnavailableError(ReceiverError):
    """A source cannot run here; ``fix`` says what would make it run."""

    def __init__(self, source: str, reason: str, fix: str = ""):
        self.source, self.reason, self.fix = source, reason, fix
        super().__init__(f"source {source} unavailable: {reason}" + (f" (fix: {fix})" if fix else ""))


class ConversionError(ReceiverError, ValueError):
    """An event that cannot be converted; the message names the field and what was wrong."""


class ExportError(ReceiverError):
    """An export request failed; ``code`` is the gRPC status code name when there was one."""

    def __init__(self, message: str, code: str = "UNKNOWN"):
        self.code = code
        super().__init__(message)


class PermanentExportError(ExportError):
    """The request will never succeed as it is: drop and count it."""


class RetryableExportError(ExportError):
    """The request may succeed later; ``retry_after`` is the server's RetryInfo delay, if any."""

    def __init__(self, message: str, code: str = "UNAVAILABLE", retry_after: float | None = None):
        super().__init__(message, code)
        self.retry_after = retry_after
