"""OtlpGrpcExporter against the real Collector: server TLS, mutual TLS, and a Collector outage
(killed and restarted on the same port) while spans keep coming."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from receiver.config import ExporterConfig, RetryConfig
from receiver.export import OtlpGrpcExporter
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from ..harness import Collector, wait_until

NS = "ebpf_receiver_exporter"
RESOURCE = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="tls-test"))])


# --------------------------------------------------------------------------- helpers

def value(t: SelfTelemetry, name: str, **labels: str) -> float:
    return t.registry.get_sample_value(f"{NS}_{name}_total", labels) or 0.0


def span(name: str) -> Span:
    return Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name=name, start_time_unix_nano=1,
                end_time_unix_nano=2)


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, signed by it."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {
        "server": "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        "client": "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def traces_only_config(path: Path, tls: dict[str, str] | None = None, batch: bool = True,
                       flush_interval: str = "100ms") -> Path:
    """deploy/otelcol/config.yaml's structure, traces pipeline only, optionally TLS on the
    receiver (gRPC and HTTP alike)."""
    grpc_cfg: dict[str, Any] = {"endpoint": "${env:OTELCOL_OTLP_GRPC_ENDPOINT}"}
    http_cfg: dict[str, Any] = {"endpoint": "${env:OTELCOL_OTLP_HTTP_ENDPOINT}"}
    if tls:
        grpc_cfg["tls"] = http_cfg["tls"] = tls
    cfg: dict[str, Any] = {
        "receivers": {"otlp": {"protocols": {"grpc": grpc_cfg, "http": http_cfg}}},
        "exporters": {"file/traces": {"path": "${env:OTELCOL_OUTPUT_DIR}/traces.jsonl",
                                      "flush_interval": flush_interval,
                                      # the file exporter truncates on start unless appending:
                                      # the restarted Collector must not erase what the first wrote
                                      "append": True}},
        "service": {"telemetry": {"metrics": {"level": "none"}},
                    "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file/traces"]}}},
    }
    if batch:
        cfg["processors"] = {"batch": {"timeout": "200ms"}}
        cfg["service"]["pipelines"]["traces"]["processors"] = ["batch"]
    path.write_text(yaml.safe_dump(cfg))
    return path


def export(config: ExporterConfig, names: list[str]) -> SelfTelemetry:
    telemetry = SelfTelemetry()

    async def main() -> None:
        exp = OtlpGrpcExporter(config, telemetry)
        try:
            await exp.start()
            for n in names:
                assert exp.submit(Signal.TRACES, RESOURCE, span(n))
            await asyncio.wait_for(exp.flush(), 30)
        finally:
            await exp.shutdown()

    asyncio.run(main())
    return telemetry


def tls_config(collector: Collector, **kw: Any) -> ExporterConfig:
    base: dict[str, Any] = dict(endpoint=f"https://127.0.0.1:{collector.port}", batch_timeout=0.05,
                                timeout=5.0, retry=RetryConfig(enabled=False), shutdown_timeout=5.0)
    base.update(kw)
    return ExporterConfig(**base)


def assert_nothing_delivered(collector: Collector, t: SelfTelemetry, n: int) -> None:
    time.sleep(1.0)  # longer than the Collector's batch timeout + file flush interval
    assert collector.spans() == []
    assert value(t, "sent_items", signal="traces") == 0
    assert value(t, "requests", signal="traces", status="UNAVAILABLE") >= 1
    assert value(t, "requests", signal="traces", status="OK") == 0
    assert value(t, "dropped_items", signal="traces", reason="retries_exhausted") == n


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_collector(otelcol_bin: str, tmp_path: Path, pki: dict[str, Path]):
    cfg = traces_only_config(tmp_path / "otelcol-tls.yaml",
                             tls={"cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"])})
    c = Collector(otelcol_bin, tmp_path, config=cfg).start()
    yield c
    c.stop()


@pytest.fixture
def mtls_collector(otelcol_bin: str, tmp_path: Path, pki: dict[str, Path]):
    cfg = traces_only_config(tmp_path / "otelcol-mtls.yaml",
                             tls={"cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"]),
                                  "client_ca_file": str(pki["ca.crt"])})
    c = Collector(otelcol_bin, tmp_path, config=cfg).start()
    yield c
    c.stop()


def delivered(collector: Collector, names: list[str]) -> Counter[str]:
    def enough() -> Counter[str] | None:
        c = Counter(s["name"] for s in collector.spans())
        return c if sum(c.values()) >= len(names) else None

    return wait_until(enough, 15, what="spans")


# --------------------------------------------------------------------------- TLS

def test_tls_with_ca_file_delivers(tls_collector: Collector, pki: dict[str, Path]) -> None:
    names = [f"tls-{i}" for i in range(5)]
    t = export(tls_config(tls_collector, ca_file=str(pki["ca.crt"])), names)
    assert value(t, "sent_items", signal="traces") == 5
    assert delivered(tls_collector, names) == Counter(names)
    assert tls_collector.spans()[0]["resource"]["service.name"] == "tls-test"


def test_tls_without_ca_file_is_unavailable_and_nothing_delivered(tls_collector: Collector) -> None:
    names = [f"untrusted-{i}" for i in range(4)]
    t = export(tls_config(tls_collector), names)
    assert_nothing_delivered(tls_collector, t, len(names))


def test_plaintext_to_tls_receiver_is_not_delivered(tls_collector: Collector) -> None:
    t = export(tls_config(tls_collector, endpoint=f"http://127.0.0.1:{tls_collector.port}"), ["plain"])
    time.sleep(1.0)
    assert tls_collector.spans() == []
    assert value(t, "sent_items", signal="traces") == 0
    assert value(t, "dropped_items", signal="traces", reason="retries_exhausted") == 1


# --------------------------------------------------------------------------- mTLS

def test_mtls_with_client_cert_delivers(mtls_collector: Collector, pki: dict[str, Path]) -> None:
    names = [f"mtls-{i}" for i in range(5)]
    t = export(tls_config(mtls_collector, ca_file=str(pki["ca.crt"]), cert_file=str(pki["client.crt"]),
                          key_file=str(pki["client.key"])), names)
    assert value(t, "sent_items", signal="traces") == 5
    assert delivered(mtls_collector, names) == Counter(names)


def test_mtls_without_client_cert_is_rejected(mtls_collector: Collector, pki: dict[str, Path]) -> None:
    names = [f"anon-{i}" for i in range(3)]
    t = export(tls_config(mtls_collector, ca_file=str(pki["ca.crt"])), names)
    assert_nothing_delivered(mtls_collector, t, len(names))


def test_mtls_with_client_cert_from_other_ca_is_rejected(mtls_collector: Collector, pki: dict[str, Path],
                                                          tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other-pki")
    t = export(tls_config(mtls_collector, ca_file=str(pki["ca.crt"]), cert_file=str(other["client.crt"]),
                          key_file=str(other["client.key"])), ["foreign"])
    assert_nothing_delivered(mtls_collector, t, 1)


# --------------------------------------------------------------------------- outage

def test_collector_killed_and_restarted_every_span_arrives_exactly_once(otelcol_bin: str,
                                                                        tmp_path: Path) -> None:
    # No batch processor and a short file flush: whatever the Collector acknowledged is on disk
    # before a SIGKILL can lose it, so a missing span is the exporter's loss, not the Collector's.
    cfg = traces_only_config(tmp_path / "otelcol-durable.yaml", batch=False, flush_interval="1ms")
    first = Collector(otelcol_bin, tmp_path, config=cfg).start()
    second: Collector | None = None
    telemetry = SelfTelemetry()
    retry = RetryConfig(initial_interval=0.2, max_interval=1.0, max_elapsed_time=60.0)
    config = ExporterConfig(endpoint=first.endpoint, batch_timeout=0.1, timeout=5.0, queue_size=100000,
                            retry=retry, shutdown_timeout=30.0)
    submitted: list[str] = []
    timeline: dict[str, float] = {}

    async def produce(exp: OtlpGrpcExporter, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                name = f"outage-{len(submitted):06d}"
                assert exp.submit(Signal.TRACES, RESOURCE, span(name)), name
                submitted.append(name)
            await asyncio.sleep(0.1)

    async def main() -> None:
        nonlocal second
        exp = OtlpGrpcExporter(config, telemetry)
        t0 = time.monotonic()
        try:
            await exp.start()
            await produce(exp, 4.0)
            timeline["kill"] = time.monotonic() - t0
            await asyncio.to_thread(first.kill)
            await produce(exp, 10.0)
            second = Collector(otelcol_bin, tmp_path, config=cfg, port=first.port)
            producer = asyncio.create_task(produce(exp, 3.0))  # keeps submitting while it starts
            await asyncio.to_thread(second.start)
            timeline["restarted"] = time.monotonic() - t0
            await producer
            await produce(exp, 3.0)
            timeline["flush"] = time.monotonic() - t0
            await asyncio.wait_for(exp.flush(), 90)
            timeline["flushed"] = time.monotonic() - t0
        finally:
            await exp.shutdown()

    try:
        asyncio.run(main())
        assert second is not None
        want = Counter(submitted)
        sent = value(telemetry, "sent_items", signal="traces")
        dropped = {r: value(telemetry, "dropped_items", signal="traces", reason=r)
                   for r in ("retries_exhausted", "permanent_error", "shutdown", "queue_full",
                             "internal_error")}
        assert sent == len(submitted), (sent, len(submitted), dropped, timeline)
        assert not any(dropped.values()), dropped

        def all_there() -> Counter[str] | None:
            got = Counter(s["name"] for s in second.spans())
            return got if set(got) >= set(want) else None

        try:
            got = wait_until(all_there, 15, what="every span in the Collector's output")
        except AssertionError:
            got = Counter(s["name"] for s in second.spans())
        missing = sorted(set(want) - set(got))
        dups = sorted(n for n, c in got.items() if c > 1)
        assert not missing, (f"{len(missing)} of {len(want)} spans missing (first: {missing[:10]}); "
                             f"timeline {timeline}; retries {value(telemetry, 'retries', signal='traces')}")
        assert not dups, (f"{len(dups)} spans delivered more than once (first: {dups[:10]}); "
                          f"timeline {timeline}")
        assert set(got) == set(want)
        assert value(telemetry, "retries", signal="traces") >= 1
        print(f"outage: {len(want)} spans, timeline {timeline}, "
              f"retries {value(telemetry, 'retries', signal='traces')}")
    finally:
        first.kill()
        if second is not None:
            second.stop()
