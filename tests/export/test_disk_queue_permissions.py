"""The on-disk queue's files are owner-only whatever the umask: each signal's directory 0700,
each request file (and its temporary name while written) 0600; a signal directory found with
wider permissions is narrowed. Telemetry can hold what processes did and said, so another user
on the host must not read, plant or delete queued requests."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.config import ExporterConfig, RetryConfig
from receiver.export import OtlpExporter
from receiver.export.disk_queue import DiskQueue
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from ..harness import free_port
from .test_exporter import RESOURCE, span, value


@pytest.fixture
def umask_0() -> Iterator[None]:
    """The widest umask: what the code asks for is what it gets."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_queued_requests_are_owner_only(tmp_path: Path, umask_0: None) -> None:
    """The Collector is unreachable: batches wait on disk; every file there is 0600 and every
    signal directory 0700."""
    root = tmp_path / "queue"
    config = ExporterConfig(endpoint=f"http://127.0.0.1:{free_port()}", batch_timeout=0.01,
                            max_batch_size=5, timeout=0.5, shutdown_timeout=0.2,
                            retry=RetryConfig(initial_interval=5.0, max_elapsed_time=60.0),
                            disk_queue_directory=str(root))
    telemetry = SelfTelemetry()

    async def main() -> None:
        exp = OtlpExporter(config, telemetry)
        await exp.start()
        try:
            for i in range(20):
                assert exp.submit(Signal.TRACES, RESOURCE, span(f"p{i}"))
            await asyncio.sleep(0.3)
        finally:
            await exp.shutdown()

    asyncio.run(main())
    files = sorted((root / "traces").iterdir())
    assert sum(int(f.name.split("-")[1].split(".")[0]) for f in files) == 20, files
    assert value(telemetry, "dropped_items", signal="traces", reason="disk_full") == 0
    for signal in Signal:
        assert mode(root / signal.value) == 0o700, (signal, oct(mode(root / signal.value)))
    assert {oct(mode(f)) for f in files} == {oct(0o600)}


def test_temporary_file_is_owner_only_while_written(tmp_path: Path, umask_0: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    q = DiskQueue(tmp_path / "traces", 1 << 20)
    q.open()
    seen: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert q.put(b"x" * 100, 1)
    assert seen == [0o600]


def test_a_signal_directory_found_wider_is_narrowed(tmp_path: Path, umask_0: None) -> None:
    """E.g. made beforehand by hand or by a provisioning tool with 0755 or 0777."""
    d = tmp_path / "traces"
    d.mkdir(mode=0o777)
    assert mode(d) == 0o777
    DiskQueue(d, 1 << 20).open()
    assert mode(d) == 0o700
