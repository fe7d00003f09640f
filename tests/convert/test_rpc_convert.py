"""gRPC calls → OTLP (receiver/convert/rpc.py): span names, attributes and error status per
side, traceparent, and the call-duration histograms with their overflow series."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from receiver.convert import rpc
from receiver.convert.http import DURATION_BOUNDARIES
from receiver.convert.rpc import RpcCall, RpcMetrics, RpcSnapshot, call_span, snapshot_metrics, split_path


def call(server: bool, grpc_status: int | None, **kw: Any) -> RpcCall:
    args: dict[str, Any] = dict(pid=7, comm="svc", cgroup_id=0, start_unix_nano=1_000, duration_ns=500,
                                server=server, service="demo.v1.Greeter", method="SayHello", http_status=200,
                                grpc_status=grpc_status, server_address="127.0.0.1", server_port=50051,
                                client_address="127.0.0.1", client_port=40000)
    args.update(kw)
    return RpcCall(**args)


def attrs(span: Span) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


@pytest.mark.parametrize("path,expect", [
    ("/demo.v1.Greeter/SayHello", ("demo.v1.Greeter", "SayHello")), ("/Svc/M", ("Svc", "M")),
    ("/index.html", ("", "")), ("/a/b/c", ("", "")), ("demo.S/M", ("", "")), ("//M", ("", "")), ("/S/", ("", ""))])
def test_split_path(path: str, expect: tuple[str, str]) -> None:
    assert split_path(path) == expect


def test_ok_call_spans_on_both_sides() -> None:
    for server in (True, False):
        s = call_span(call(server, 0))
        assert s.name == "demo.v1.Greeter/SayHello"
        assert s.kind == (Span.SPAN_KIND_SERVER if server else Span.SPAN_KIND_CLIENT)
        assert (s.start_time_unix_nano, s.end_time_unix_nano) == (1_000, 1_500)
        assert attrs(s) == {"rpc.system": "grpc", "rpc.service": "demo.v1.Greeter", "rpc.method": "SayHello",
                            "rpc.grpc.status_code": 0, "network.protocol.name": "http",
                            "network.protocol.version": "2", "server.address": "127.0.0.1", "server.port": 50051,
                            "client.address": "127.0.0.1", "client.port": 40000}
        assert s.status.code == Status.STATUS_CODE_UNSET


@pytest.mark.parametrize("status,server_error", [(5, False), (3, False), (2, True), (4, True), (12, True), (13, True),
                                                 (14, True), (15, True)])
def test_error_status_per_side(status: int, server_error: bool) -> None:
    client = call_span(call(False, status))
    assert client.status.code == Status.STATUS_CODE_ERROR and attrs(client)["error.type"] == str(status)
    server = call_span(call(True, status))
    assert (server.status.code == Status.STATUS_CODE_ERROR) == server_error
    assert ("error.type" in attrs(server)) == server_error


def test_calls_without_trailers() -> None:
    reset = call_span(call(True, None, error="stream reset"))
    assert reset.status.code == Status.STATUS_CODE_ERROR and attrs(reset)["error.type"] == "stream_reset"
    assert "rpc.grpc.status_code" not in attrs(reset)
    closed = call_span(call(False, None, error="connection closed"))
    assert attrs(closed)["error.type"] == "connection_closed"
    unknown = call_span(call(True, None))   # trailers that were unknown HPACK entries: no guess
    assert unknown.status.code == Status.STATUS_CODE_UNSET and "rpc.grpc.status_code" not in attrs(unknown)
    http_error = call_span(call(False, None, http_status=503))
    assert attrs(http_error)["error.type"] == "503"


def test_traceparent_joins_the_callers_trace() -> None:
    s = call_span(call(True, 0, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    assert s.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and s.parent_span_id.hex() == "00f067aa0ba902b7"
    assert call_span(call(True, 0, traceparent="garbage")).parent_span_id == b""


def test_calls_sharing_a_template_get_their_own_ids_and_times_and_the_templates_are_bounded() -> None:
    first, second = call_span(call(True, 0)), call_span(call(True, 0, start_unix_nano=5_000, duration_ns=7))
    assert first.span_id != second.span_id and first.trace_id != second.trace_id and len(second.span_id) == 8
    assert (second.start_time_unix_nano, second.end_time_unix_nano) == (5_000, 5_007)
    assert first.attributes == second.attributes and not second.parent_span_id
    other = call_span(call(True, 13, client_port=40001))
    assert attrs(other)["client.port"] == 40001 and other.status.code == Status.STATUS_CODE_ERROR
    for port in range(rpc.MAX_TEMPLATES + 5):
        assert attrs(call_span(call(False, 0, client_port=port)))["client.port"] == port
    assert len(rpc._templates) <= rpc.MAX_TEMPLATES


def test_histograms_by_method_and_status_with_an_overflow_series() -> None:
    m = RpcMetrics(max_attribute_sets=3)
    for server, method, status, seconds in [(True, "A", 0, 0.001), (True, "A", 0, 0.2), (False, "A", 5, 0.02),
                                            (True, "B", -1, 3.0), (True, "C", 0, 0.001), (False, "D", 0, 0.001)]:
        m.observe(7, "svc", (server, "demo.S", method, status, "127.0.0.1", 50051), seconds)
    assert m.overflowed == 2
    out = dict(snapshot_metrics(RpcSnapshot(1, 2, DURATION_BOUNDARIES, m.by_pid())))
    names = {metric.name: metric for metric in out[7]}
    assert set(names) == {"rpc.server.call.duration", "rpc.client.call.duration"}
    server = names["rpc.server.call.duration"]
    assert server.unit == "s"
    points = {tuple((kv.key, kv.value.string_value or kv.value.int_value) for kv in dp.attributes
                    if kv.key in ("rpc.method", "rpc.grpc.status_code")): dp for dp in server.histogram.data_points}
    a = points[(("rpc.method", "A"), ("rpc.grpc.status_code", 0))]
    assert a.count == 2 and sum(a.bucket_counts) == 2 and list(a.explicit_bounds) == list(DURATION_BOUNDARIES)
    b = points[(("rpc.method", "B"),)]   # status unknown: no status attribute
    assert b.count == 1
    overflow = dict(snapshot_metrics(RpcSnapshot(1, 2, DURATION_BOUNDARIES, m.by_pid())))[0]
    assert sum(dp.count for metric in overflow for dp in metric.histogram.data_points) == 2
    assert all(kv.key == "otel.metric.overflow" for metric in overflow for dp in metric.histogram.data_points
               for kv in dp.attributes)
