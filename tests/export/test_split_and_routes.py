"""Generic request splitting (any signal; the profiles dictionary copied into each part) and the
resolution of endpoints, protocols and per-signal settings from config and OTEL_* variables."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from receiver.config import EbpfConfig, ExporterConfig
from receiver.convert.attributes import to_key_values
from receiver.errors import ConfigError
from receiver.export import count_items, split_request
from receiver.export.exporter import resolve_route
from receiver.export.retry import parse_retry_after
from receiver.model import Signal

from .test_exporter import span


def profiles_request(processes: int, samples: int) -> ExportProfilesServiceRequest:
    d = pb.ProfilesDictionary(string_table=["", "samples", "count"] + [f"fn{i}" for i in range(200)])
    req = ExportProfilesServiceRequest(dictionary=d)
    for pid in range(processes):
        rp = req.resource_profiles.add()
        rp.resource.attributes.extend(to_key_values({"process.pid": 1000 + pid}))
        sp = rp.scope_profiles.add()
        for k in range(2):
            prof = sp.profiles.add(sample_type=pb.ValueType(type_strindex=1, unit_strindex=2),
                                   profile_id=bytes([pid, k]) * 8)
            for s in range(samples):
                prof.samples.add(stack_index=s, values=[s + 1])
    return req


def names(req: ExportTraceServiceRequest) -> list[str]:
    return [s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def test_profiles_split_by_resource_then_items_with_the_dictionary_in_each_part() -> None:
    req = profiles_request(processes=6, samples=100)
    limit = req.ByteSize() // 4
    parts = split_request(Signal.PROFILES, req, limit)
    assert len(parts) > 1
    assert all(p.ByteSize() <= limit for p in parts)
    assert all(p.dictionary == req.dictionary for p in parts)
    ids = [pr.profile_id for p in parts for rp in p.resource_profiles for sp in rp.scope_profiles
           for pr in sp.profiles]
    assert ids == [pr.profile_id for rp in req.resource_profiles for sp in rp.scope_profiles
                   for pr in sp.profiles]
    assert sum(count_items(Signal.PROFILES, p) for p in parts) == count_items(Signal.PROFILES, req) == 12
    # one resource's two profiles end up split too when one resource alone is over the limit
    one = profiles_request(processes=1, samples=400)
    parts = split_request(Signal.PROFILES, one, one.ByteSize() * 2 // 3)
    assert len(parts) == 2 and all(count_items(Signal.PROFILES, p) == 1 for p in parts)


def test_unsplittable_requests_come_back_whole() -> None:
    req = profiles_request(processes=3, samples=10)
    assert split_request(Signal.PROFILES, req, req.dictionary.ByteSize()) == [req]  # shell too big
    assert split_request(Signal.PROFILES, req, req.ByteSize()) == [req]             # fits
    big = ExportTraceServiceRequest()
    big.resource_spans.add().scope_spans.add().spans.append(span("x" * 5000))
    assert split_request(Signal.TRACES, big, 1024) == [big]                          # one item


def test_traces_split_keeps_order_across_resources() -> None:
    req = ExportTraceServiceRequest()
    for r in range(3):
        rs = req.resource_spans.add()
        rs.resource.attributes.extend(to_key_values({"process.pid": r}))
        rs.scope_spans.add().spans.extend(span(f"r{r}-{i}-" + "y" * 100) for i in range(20))
    parts = split_request(Signal.TRACES, req, 1500)
    assert all(p.ByteSize() <= 1500 for p in parts)
    assert [n for p in parts for n in names(p)] == names(req)


# --------------------------------------------------------------------------- routes

def route(environ: dict[str, str], signal: Signal = Signal.TRACES, **file: object):
    config = EbpfConfig.from_dict({"exporter": file} if file else {}, environ=environ)
    return resolve_route(config.exporter, signal)


def test_default_endpoints_follow_the_protocol() -> None:
    assert route({}).url == "localhost:4317" and route({}).protocol == "grpc"
    r = route({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert r.url == "http://localhost:4318/v1/traces" and not r.use_tls
    assert route({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, Signal.PROFILES).url == \
        "http://localhost:4318/v1development/profiles"


def test_base_endpoint_gets_the_signal_path_and_per_signal_endpoint_is_used_as_is() -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "https://gw.example:4443/otlp/",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom"}
    assert route(env).url == "https://traces.example/custom" and route(env).use_tls
    assert route(env, Signal.METRICS).url == "https://gw.example:4443/otlp/v1/metrics"
    assert route(env, Signal.LOGS).url == "https://gw.example:4443/otlp/v1/logs"
    assert route(env, Signal.PROFILES).url == "https://gw.example:4443/otlp/v1development/profiles"


def test_per_signal_variables_override_the_shared_ones() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=2", "OTEL_EXPORTER_OTLP_TIMEOUT": "2000",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
           "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://logs:4318/v1/logs",
           "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "c=3", "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "500",
           "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "none"}
    traces, logs = route(env), route(env, Signal.LOGS)
    assert (traces.protocol, traces.headers, traces.timeout, traces.compression) == \
        ("grpc", (("a", "1"), ("b", "2")), 2.0, "gzip")
    assert (logs.protocol, logs.url, logs.headers, logs.timeout, logs.compression) == \
        ("http/protobuf", "http://logs:4318/v1/logs", (("c", "3"),), 0.5, "none")


def test_file_per_signal_section_and_bad_values() -> None:
    r = route({}, Signal.METRICS, protocol="http/protobuf", endpoint="http://base:4318",
              metrics={"endpoint": "http://m:9999/x", "timeout": "3s"})
    assert r.url == "http://m:9999/x" and r.timeout == 3.0
    with pytest.raises(ConfigError, match="exporter.protocol: expected one of"):
        EbpfConfig.from_dict({}, environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "http"})
    for bad in ("soon", "nan", "inf", "0", "-5"):
        with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
            EbpfConfig.from_dict({}, environ={"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": bad})
    with pytest.raises(ConfigError, match="exporter.logs.cert_file/key_file"):
        EbpfConfig.from_dict({"exporter": {"logs": {"cert_file": __file__}}}, environ={})


def test_default_and_load_agree_about_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "svc"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert EbpfConfig.default() == EbpfConfig.load()
    assert EbpfConfig.default().exporter.protocol == "http/protobuf"
    assert EbpfConfig.default(environ={}) == EbpfConfig()


def test_explicit_grpc_port_is_kept_for_http() -> None:
    # Only the endpoint nobody set follows the protocol; a given one is used as given.
    c = ExporterConfig(protocol="http/protobuf", endpoint="http://localhost:4317")
    assert resolve_route(c, Signal.TRACES).url == "http://localhost:4317/v1/traces"


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
