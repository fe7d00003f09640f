"""What to do with a failed export: classify the gRPC status or the HTTP response per the OTLP
specification, and compute the exponential backoff with jitter (defaults as the Collector's
``configretry``)."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Iterator

import grpc

from ..config import RetryConfig
from ..errors import ExportError, PermanentExportError, RetryableExportError

__all__ = [
    "RETRYABLE_CODES",
    "RETRYABLE_HTTP_STATUSES",
    "Backoff",
    "classify_http_status",
    "classify_rpc_error",
    "parse_retry_after",
]

# OTLP/gRPC "Failures": retryable codes. RESOURCE_EXHAUSTED only with RetryInfo (handled below).
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})

# OTLP/HTTP "Failures": only these are retried; every other 4xx/5xx is permanent.
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


def _retry_info_delay(error: grpc.RpcError) -> float | None:
    """The ``google.rpc.RetryInfo.retry_delay`` in the status details trailer, in seconds."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if not trailers:
        return None
    for key, value in trailers:
        if key != _STATUS_DETAILS_KEY:
            continue
        from google.rpc import error_details_pb2, status_pb2

        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.type_url == _RETRY_INFO_TYPE:
                info = error_details_pb2.RetryInfo.FromString(detail.value)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def classify_rpc_error(error: grpc.RpcError) -> ExportError:
    """Maps a failed call to a retryable or permanent error, keeping the server's message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    name = code.name if code is not None else "UNKNOWN"
    if code in RETRYABLE_CODES:
        return RetryableExportError(details, name, _retry_info_delay(error))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        delay = _retry_info_delay(error)
        if delay is not None:
            return RetryableExportError(details, name, delay)
    return PermanentExportError(details, name)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_http_status(status: int, message: str, retry_after: str | None) -> ExportError:
    """Maps a non-2xx OTLP/HTTP response to a retryable or permanent error; the status code
    is the error's ``code`` (the ``status`` label of the request counter)."""
    code = str(status)
    if status in RETRYABLE_HTTP_STATUSES:
        return RetryableExportError(message, code, parse_retry_after(retry_after))
    return PermanentExportError(message, code)


class Backoff:
    """Delays between attempts: ``initial × multiplier^n``, capped at ``max_interval``, each
    randomized by ±``randomization_factor``; a server's RetryInfo delay replaces the computed one."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None):
        self.config = config
        self._rng = rng or random.Random()

    def delays(self) -> Iterator[float]:
        interval = self.config.initial_interval
        while True:
            r = self.config.randomization_factor
            yield interval * (1 - r + 2 * r * self._rng.random())
            interval = min(interval * self.config.multiplier, self.config.max_interval)
