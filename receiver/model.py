"""``EbpfEvent`` and its ``EbpfEventType``: an event in semantic-convention terms, what
``EbpfOtlpConverter`` converts. Library users build them; the agent's pipeline makes them from
the sources' typed records (``receiver.records``) with the rules of ``receiver.convert``, so both
go through the same conversion.

Times are wall-clock Unix nanoseconds, already mapped from the kernel's monotonic clock
(``receiver.kernel.clock.KernelClock``).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EbpfEvent", "EbpfEventType", "Signal"]


class Signal(str, enum.Enum):
    """The four OTLP signals; values are the names used in self-metrics labels."""

    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"
    PROFILES = "profiles"


class EbpfEventType(str, enum.Enum):
    """What an ``EbpfEvent`` is; the value is its name in OpenTelemetry data."""

    PROCESS_EXEC = "process.exec"
    PROCESS_EXIT = "process.exit"
    PROCESS_FORK = "process.fork"
    PROCESS_OOM_KILL = "process.oom_kill"
    CPU_SAMPLE = "cpu.sample"                          # on-CPU samples of one thread
    NETWORK_PACKET = "network.packet"                  # one packet (or a burst) sent or received
    NETWORK_CONNECTION = "network.connection"          # a finished TCP connection
    NETWORK_CONNECTION_ACTIVE = "network.connection.active"  # still open at a report interval
    SYSCALL = "syscall"                                # one (slow) system call


@dataclass(slots=True)
class EbpfEvent:
    """One thing a BPF program saw, in the design document's order:
    ``EbpfEvent(EbpfEventType.NETWORK_PACKET, pid, tid, data)``.

    ``data`` is the raw record (bytes; a list of byte values is taken as bytes). ``attributes``
    holds semantic-convention keys for the signal (``network.io.direction``,
    ``syscall.name`` …). ``timestamp_unix_nano`` is when it started (now, when not given) and
    ``duration_ns`` how long it took. What does not fit is reported as a ``ConversionError`` when
    the event is converted.
    """

    event_type: EbpfEventType
    pid: int
    tid: int = 0
    data: bytes = b""
    timestamp_unix_nano: int = 0
    duration_ns: int = 0
    comm: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    cgroup_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple, bytearray, memoryview)):
            try:
                self.data = bytes(self.data)
            except (TypeError, ValueError):
                pass   # left as given: conversion names the problem
        if self.timestamp_unix_nano == 0:
            self.timestamp_unix_nano = time.time_ns()

    @property
    def end_unix_nano(self) -> int:
        return self.timestamp_unix_nano + self.duration_ns
