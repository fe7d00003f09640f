"""``check`` names a protocol/endpoint mismatch against the real Collector (gRPC spoken to its
OTLP/HTTP port, and HTTP to its gRPC port), and blocks on it; a Collector that is not up is
reported without blocking."""

from __future__ import annotations

from receiver import preflight
from receiver.config import EbpfConfig, ExporterConfig
from receiver.export.probe import probe_endpoints

from ..harness import Collector, free_port


def only(config: ExporterConfig):  # type: ignore[no-untyped-def]
    rows = probe_endpoints(config)
    assert len(rows) == 1, rows
    return rows[0]


def test_matching_protocols_answer(collector: Collector) -> None:
    assert only(ExporterConfig(endpoint=collector.endpoint)).ok
    assert only(ExporterConfig(protocol="http/protobuf", endpoint=collector.http_endpoint)).ok
    assert only(ExporterConfig(protocol="http/json", endpoint=collector.http_endpoint)).ok


def test_grpc_to_the_http_port_is_a_mismatch(collector: Collector) -> None:
    row = only(ExporterConfig(endpoint=collector.http_endpoint))
    assert not row.ok and row.blocking
    assert "protocol mismatch" in row.detail
    assert "exporter.protocol: http/protobuf" in row.fix


def test_http_to_the_grpc_port_is_a_mismatch(collector: Collector) -> None:
    row = only(ExporterConfig(protocol="http/protobuf", endpoint=collector.endpoint))
    assert not row.ok and row.blocking
    assert "exporter.protocol: grpc" in row.fix


def test_nothing_listening_is_reported_but_does_not_block() -> None:
    for config in (ExporterConfig(endpoint=f"http://127.0.0.1:{free_port()}"),
                   ExporterConfig(protocol="http/protobuf", endpoint=f"http://127.0.0.1:{free_port()}")):
        row = only(config)
        assert not row.ok and not row.blocking and "not reachable" in row.detail


def test_check_rows_block_on_a_mismatch(collector: Collector) -> None:
    config = EbpfConfig.from_dict({"exporter": {"endpoint": collector.http_endpoint}}, environ={})
    rows = [r for r in preflight.run_checks(config) if r.requirement.startswith("exporter endpoint")]
    assert len(rows) == 1 and not rows[0].ok and rows[0].needed_by
    assert "fix: this port speaks OTLP/HTTP" in preflight.format_rows(rows)
