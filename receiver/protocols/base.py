"""What every protocol parser shares: the exchange it completes and the tally of what it could
not parse."""

from __future__ import annotations

__all__ = ["Exchange", "Unparsed"]


class Exchange:
    """One request and its response, as seen on one side of a connection. Times are the kernel's
    monotonic nanoseconds of the first request byte and the last response byte."""

    __slots__ = ("server", "start_ns", "end_ns", "method", "path", "version", "status", "traceparent",
                 "error", "tid", "trace_id", "span_id", "parent_id")

    def __init__(self, server: bool, start_ns: int, method: str, path: str, version: str,
                 traceparent: str | None):
        self.server = server            # this side received the request (a SERVER span)
        self.start_ns = start_ns
        self.end_ns = start_ns
        self.method = method            # as sent (normalised by the conversion)
        self.path = path                # the request target without its query
        self.version = version          # "1.0" or "1.1"
        self.status = 0                 # 0: no response
        self.traceparent = traceparent  # the request's W3C traceparent header, unchecked
        self.error: str | None = None   # why there is no response (e.g. the connection closed)
        # Set by the source, not the parser: the thread that read (server) or sent (client) the
        # request head, and span ids decided before the exchange completes (so that requests the
        # serving thread makes meanwhile can name this one as their parent).
        self.tid = 0
        self.trace_id: bytes | None = None
        self.span_id: bytes | None = None
        self.parent_id: bytes | None = None

    def __repr__(self) -> str:
        return (f"Exchange({'server' if self.server else 'client'} {self.method} {self.path} "
                f"HTTP/{self.version} -> {self.status}{' ' + self.error if self.error else ''})")


class Unparsed:
    """Counts per reason, fixed from the start (every reason has a series at 0)."""

    __slots__ = ("counts",)

    def __init__(self, reasons: tuple[str, ...]):
        self.counts = dict.fromkeys(reasons, 0)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n
