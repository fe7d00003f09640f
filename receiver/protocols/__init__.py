"""Application protocols parsed from captured connection bytes, for the request source
(``receiver/sources/http.py``).

The seam is two-sided. A *capture* (today the syscall tracepoints of ``bpf/http.bpf.c``; later
TLS library uprobes, which see the same plaintext) hands each connection's bytes in order,
per direction, with how many bytes the call moved beyond those captured. A *protocol* is a class
whose instances parse one connection: ``feed(outgoing, data, size, ts)``, ``gap()``,
``close(ts)``, and completed ``Exchange``s in ``exchanges``; unparsable input is counted per
reason in a shared ``Unparsed`` tally, never raised. ``PROTOCOLS`` maps a name to its class; the
source picks one per connection by its first bytes (``detect``).
"""

from __future__ import annotations

from .base import Exchange, Unparsed
from .http1 import UNPARSED_REASONS as HTTP1_REASONS
from .http1 import Http1Connection, looks_like_http1
from .http2 import UNPARSED_REASONS as HTTP2_REASONS
from .http2 import Http2Connection, looks_like_http2, starts_with_headers

__all__ = ["Exchange", "Unparsed", "Http1Connection", "Http2Connection", "PROTOCOLS", "UNPARSED_REASONS",
           "detect"]

PROTOCOLS: dict[str, type[Http1Connection] | type[Http2Connection]] = {
    "http1": Http1Connection, "http2": Http2Connection}
UNPARSED_REASONS = HTTP1_REASONS + HTTP2_REASONS   # one tally for every protocol of the source


def detect(data: bytes) -> str | None:
    """The protocol whose messages start like ``data``, or None."""
    if looks_like_http2(data) or starts_with_headers(data):   # a connection's start, or mid-way
        return "http2"
    return "http1" if looks_like_http1(data) else None
