"""Spans per second and CPU per span: our OTLP/gRPC exporter against the OpenTelemetry SDK
(TracerProvider + BatchSpanProcessor + OTLPSpanExporter), both sending N spans with the same three
attributes to the same real Collector, side by side in one run. Timed from the first span built to
the flush returning, span construction included; CPU is this process's (all threads). The
Collector runs with a config that only counts (debug exporter, sampled to near-silence) so the
file exporter does not set the pace. Ours runs twice, over OTLP/gRPC and over OTLP/HTTP
(http/protobuf, aiohttp), same queue and batching. Every run must deliver all N spans or the
benchmark fails. Targets: ours ≥ 100000 spans/s and a CPU-per-span advantage ≥ 5× over the SDK;
HTTP ≥ 70 % of gRPC's spans/s.

Smoke mode (``--smoke``): 2 000 spans each (200 to warm up), every run still required to deliver
them all; a few seconds."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ._support import discarding_collector_yaml, otelcol_bin

N = 100_000
BATCH = int(os.environ.get("BENCH_EXPORTER_BATCH", "2048"))  # ours: max_batch_size (512..8192)
CHUNK = 1000          # ours: spans submitted between yields to the event loop
WARMUP = 2_000        # spans sent by each side before timing (channel up, code paths warm)
SMOKE_N, SMOKE_WARMUP = 2_000, 200
# Same on both sides; "none" is the SDK exporter's default (ours defaults to gzip).
COMPRESSION = os.environ.get("BENCH_EXPORTER_COMPRESSION", "none")

COLLECTOR_YAML = discarding_collector_yaml(("traces",))

ATTRS = (("service.component", "bench"), ("http.method", "GET"), ("http.route", "/api/v1/items"))


class _ErrorCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# ---------------------------------------------------------------------------------------- ours

def _run_ours(endpoint: str, n: int, protocol: str = "grpc", warmup: int = WARMUP) -> dict[str, float]:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from receiver.config import ExporterConfig
    from receiver.export import OtlpExporter
    from receiver.model import Signal
    from receiver.telemetry import SelfTelemetry

    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="bench"))])
    config = ExporterConfig(protocol=protocol, endpoint=endpoint, compression=COMPRESSION,
                            max_batch_size=BATCH,
                            queue_size=max(20000, 4 * BATCH), batch_timeout=0.2)
    telemetry = SelfTelemetry()
    getrandbits = random.getrandbits
    now_ns = time.time_ns
    kind = Span.SPAN_KIND_INTERNAL
    # Built once, copied into every span by protobuf (as the SDK side reuses one attributes dict).
    attrs = [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in ATTRS]

    def make_span(i: int) -> Span:
        t = now_ns()
        return Span(trace_id=getrandbits(128).to_bytes(16, "big"),
                    span_id=getrandbits(64).to_bytes(8, "big"),
                    name="bench-span", kind=kind, start_time_unix_nano=t, end_time_unix_nano=t + 1000,
                    attributes=attrs)

    async def go() -> dict[str, float]:
        exporter = OtlpExporter(config, telemetry)
        await exporter.start()
        submit = exporter.submit
        traces = Signal.TRACES
        queue = exporter._queues[traces]
        dropped = 0

        async def send(count: int) -> None:
            nonlocal dropped
            i = 0
            while i < count:
                # Back-pressure instead of drops: a full queue means the producer outran the wire.
                while queue.depth + CHUNK > queue.capacity:
                    await asyncio.sleep(0.001)
                for j in range(i, min(i + CHUNK, count)):
                    if not submit(traces, resource, make_span(j)):
                        dropped += 1
                i += CHUNK
                await asyncio.sleep(0)  # what a real source does between ring-buffer polls
            await exporter.flush()

        await send(warmup)
        base = telemetry.exported_items.labels("traces")._value.get()
        w0, c0 = time.perf_counter(), time.process_time()
        await send(n)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        sent = telemetry.exported_items.labels("traces")._value.get() - base
        await exporter.shutdown()
        requests = sum(telemetry.export_requests.labels("traces", ok)._value.get() for ok in ("OK", "200"))
        return {"wall": wall, "cpu": cpu, "sent": sent, "dropped": dropped, "requests": requests}

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------- SDK

def _run_sdk(endpoint: str, n: int, warmup: int = WARMUP) -> dict[str, float]:
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

    class CountingExporter(OTLPSpanExporter):
        ok = 0
        failed = 0

        def export(self, spans):  # type: ignore[no-untyped-def]
            result = super().export(spans)
            if result is SpanExportResult.SUCCESS:
                CountingExporter.ok += len(spans)
            else:
                CountingExporter.failed += len(spans)
            return result

    errors = _ErrorCounter()
    logging.getLogger("opentelemetry").addHandler(errors)
    compression = grpc.Compression.Gzip if COMPRESSION == "gzip" else grpc.Compression.NoCompression
    exporter = CountingExporter(endpoint=endpoint, insecure=True, compression=compression)
    # Queue big enough that nothing is dropped: the SDK drops spans on a full queue.
    processor = BatchSpanProcessor(exporter, max_queue_size=n + warmup)
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")
    attrs = dict(ATTRS)

    def send(count: int) -> bool:
        for _ in range(count):
            span = tracer.start_span("bench-span", attributes=attrs)
            span.end()
        return provider.force_flush(60_000)

    try:
        send(warmup)
        base_ok = CountingExporter.ok
        w0, c0 = time.perf_counter(), time.process_time()
        flushed = send(n)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        sent = CountingExporter.ok - base_ok
        provider.shutdown()
    finally:
        logging.getLogger("opentelemetry").removeHandler(errors)
    return {"wall": wall, "cpu": cpu, "sent": sent, "failed": CountingExporter.failed,
            "flushed": float(flushed), "errors": len(errors.records)}


# ----------------------------------------------------------------------------------------- run

def run(smoke: bool = False) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.harness import Collector

    n, warmup = (SMOKE_N, SMOKE_WARMUP) if smoke else (N, WARMUP)
    workdir = Path(tempfile.mkdtemp(prefix="bench-exporter-"))
    config = workdir / "otelcol.yaml"
    config.write_text(COLLECTOR_YAML)
    collector = Collector(otelcol_bin(), workdir, config=config).start()
    try:
        ours = _run_ours(collector.endpoint, n, warmup=warmup)
        http = _run_ours(collector.http_endpoint, n, "http/protobuf", warmup)
        sdk = _run_sdk(f"127.0.0.1:{collector.port}", n, warmup)
    finally:
        collector.stop()
    shutil.rmtree(workdir, ignore_errors=True)

    ok = True
    for label, run in (("ours (gRPC)", ours), ("ours (HTTP)", http)):
        if run["sent"] != n or run["dropped"]:
            print(f"exporter: {label} delivered {run['sent']:.0f} of {n} (dropped {run['dropped']:.0f})",
                  file=sys.stderr)
            ok = False
    if sdk["sent"] != n or not sdk["flushed"] or sdk["errors"] or sdk["failed"]:
        print(f"exporter: SDK delivered {sdk['sent']:.0f} of {n} (force_flush={bool(sdk['flushed'])}, "
              f"{sdk['errors']:.0f} warnings/errors logged, {sdk['failed']:.0f} failed)", file=sys.stderr)
        ok = False

    def row(label: str, fmt: str, a: float, h: float, b: float) -> None:
        print(f"  {label:<28}{fmt.format(a):>16}{fmt.format(h):>16}{fmt.format(b):>16}")

    print(f"exporter: {n} spans, 3 attributes each, to the real Collector (debug exporter, sampled); "
          f"compression {COMPRESSION}; ours max_batch_size={BATCH}, SDK BatchSpanProcessor "
          f"max_export_batch_size=512 (default)")
    print(f"  {'':<28}{'ours gRPC':>16}{'ours HTTP':>16}{'SDK gRPC':>16}")
    row("delivered spans", "{:.0f}", ours["sent"], http["sent"], sdk["sent"])
    row("requests", "{:.0f}", ours["requests"], http["requests"], float("nan"))
    row("wall s", "{:.3f}", ours["wall"], http["wall"], sdk["wall"])
    row("CPU s", "{:.3f}", ours["cpu"], http["cpu"], sdk["cpu"])
    row("spans / wall s", "{:,.0f}", n / ours["wall"], n / http["wall"], n / sdk["wall"])
    row("spans / CPU s", "{:,.0f}", n / ours["cpu"], n / http["cpu"], n / sdk["cpu"])
    row("µs CPU / span", "{:.2f}", 1e6 * ours["cpu"] / n, 1e6 * http["cpu"] / n, 1e6 * sdk["cpu"] / n)
    ratio = (n / ours["cpu"]) / (n / sdk["cpu"])
    print(f"bench: exporter cpu_s_per_100k_ours={ours['cpu'] * 100_000 / n:.3f} s")
    print(f"bench: exporter cpu_s_per_100k_sdk={sdk['cpu'] * 100_000 / n:.3f} s")
    print(f"bench: exporter spans_per_s={n / ours['wall']:.0f} spans/s")
    print(f"bench: exporter ratio_vs_sdk={ratio:.2f} ratio")
    print(f"bench: exporter http_spans_per_s={n / http['wall']:.0f} spans/s")
    print(f"bench: exporter http_vs_grpc={ours['wall'] / http['wall']:.2f} ratio")
    return 0 if ok else 1
