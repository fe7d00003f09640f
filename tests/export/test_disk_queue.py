"""The optional on-disk queue against the real Collector: an outage that overflows the memory
queue, with the exporter restarted in the middle of it, loses nothing and duplicates nothing;
past its byte bound, what is dropped is counted."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from receiver.config import ExporterConfig, RetryConfig
from receiver.export import OtlpExporter
from receiver.export.disk_queue import DiskQueue
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from ..harness import Collector, free_port, wait_until
from .test_exporter import RESOURCE, span, value
from .test_tls_and_outage import traces_only_config

pytestmark = pytest.mark.collector


def disk_config(endpoint: str, protocol: str, directory: Path, **kw: Any) -> ExporterConfig:
    base: dict[str, Any] = {
        "protocol": protocol, "endpoint": endpoint, "batch_timeout": 0.05, "max_batch_size": 50,
        "queue_size": 100, "timeout": 2.0, "shutdown_timeout": 1.0,
        "retry": RetryConfig(initial_interval=0.2, max_interval=1.0, max_elapsed_time=120.0),
        "disk_queue_directory": str(directory)}
    base.update(kw)
    return ExporterConfig(**base)


async def produce(exp: OtlpExporter, names: list[str], start: int, n: int) -> None:
    """``n`` spans in steps of 100 every 50 ms: faster than the memory queue (100) could hold."""
    for i in range(start, start + n):
        name = f"disk-{i:05d}"
        assert exp.submit(Signal.TRACES, RESOURCE, span(name)), name
        names.append(name)
        if i % 100 == 99:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_outage_with_a_restart_in_the_middle_loses_and_duplicates_nothing(
        otelcol_bin: str, tmp_path: Path, protocol: str) -> None:
    cfg = traces_only_config(tmp_path / "otelcol.yaml", batch=False, flush_interval="1ms")
    collector = Collector(otelcol_bin, tmp_path, config=cfg)   # not started: the outage
    endpoint = collector.endpoint if protocol == "grpc" else collector.http_endpoint
    config = disk_config(endpoint, protocol, tmp_path / "queue")
    first, second = SelfTelemetry(), SelfTelemetry()
    names: list[str] = []

    async def before_restart() -> None:
        exp = OtlpExporter(config, first)
        await exp.start()
        try:
            await produce(exp, names, 0, 1500)
            await asyncio.sleep(0.3)
        finally:
            await exp.shutdown()

    async def after_restart() -> None:
        exp = OtlpExporter(config, second)
        await exp.start()
        try:
            await produce(exp, names, 1500, 1500)
            await asyncio.to_thread(collector.start)   # the outage ends
            await asyncio.wait_for(exp.flush(), 60)
        finally:
            await exp.shutdown()

    try:
        asyncio.run(before_restart())
        dropped_first = {r: value(first, "dropped_items", signal="traces", reason=r)
                         for r in ("queue_full", "shutdown", "disk_full", "retries_exhausted")}
        assert not any(dropped_first.values()), dropped_first
        assert value(first, "sent_items", signal="traces") == 0
        on_disk = DiskQueue(tmp_path / "queue" / "traces", 1 << 30)
        assert on_disk.open() == 1500
        asyncio.run(after_restart())
        assert value(second, "sent_items", signal="traces") == 3000
        assert value(second, "retries", signal="traces") >= 1

        def all_there() -> Counter[str] | None:
            got = Counter(s["name"] for s in collector.spans())
            return got if sum(got.values()) >= 3000 else None

        got = wait_until(all_there, 20, what="3000 spans in the Collector's output")
        assert set(got) == set(names)
        assert max(got.values()) == 1, [n for n, c in got.items() if c > 1][:10]
        assert list((tmp_path / "queue" / "traces").iterdir()) == []
    finally:
        collector.stop()


def test_past_the_byte_bound_drops_are_counted(tmp_path: Path) -> None:
    telemetry = SelfTelemetry()
    config = disk_config(f"http://127.0.0.1:{free_port()}", "grpc", tmp_path / "q",
                         disk_queue_max_bytes=8192)

    async def main() -> None:
        exp = OtlpExporter(config, telemetry)
        await exp.start()
        try:
            await produce(exp, [], 0, 500)
            await asyncio.sleep(0.3)
        finally:
            t0 = time.monotonic()
            await exp.shutdown()
            assert time.monotonic() - t0 < 5

    asyncio.run(main())
    kept = DiskQueue(tmp_path / "q" / "traces", 8192)
    on_disk = kept.open()
    dropped = value(telemetry, "dropped_items", signal="traces", reason="disk_full")
    assert 0 < on_disk and kept.bytes <= 8192
    assert dropped > 0
    assert on_disk + dropped == 500
    assert value(telemetry, "dropped_items", signal="traces", reason="queue_full") == 0
