"""OTLP/HTTP against the real Collector with TLS and mutual TLS on its HTTP receiver: the same
cases as the gRPC ones in test_tls_and_outage.py."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from receiver.config import ExporterConfig
from receiver.model import Signal

from ..harness import Collector
from .test_http_collector import export as export_with
from .test_tls_and_outage import (
    RESOURCE,
    assert_nothing_delivered,
    delivered,
    make_pki,
    span,
    value,
)
from .test_tls_and_outage import tls_config as grpc_tls_config


def export(config: ExporterConfig, names: list[str]) -> Any:
    def submit(exp: Any) -> None:
        for n in names:
            assert exp.submit(Signal.TRACES, RESOURCE, span(n))

    return export_with(config, submit)


def tls_config(collector: Collector, **kw: Any) -> ExporterConfig:
    base = grpc_tls_config(collector, **kw)
    scheme = "https" if "endpoint" not in kw else kw["endpoint"].split(":", 1)[0]
    return dataclasses.replace(base, protocol="http/protobuf",
                               endpoint=f"{scheme}://127.0.0.1:{collector.http_port}")


def test_https_with_ca_file_delivers(tls_collector: Collector, pki: dict[str, Path]) -> None:
    names = [f"https-{i}" for i in range(5)]
    t = export(tls_config(tls_collector, ca_file=str(pki["ca.crt"])), names)
    assert value(t, "sent_items", signal="traces") == 5
    assert value(t, "requests", signal="traces", status="200") == 1
    assert delivered(tls_collector, names) == Counter(names)


def test_https_without_ca_file_is_unavailable_and_nothing_delivered(tls_collector: Collector) -> None:
    names = [f"untrusted-{i}" for i in range(4)]
    t = export(tls_config(tls_collector), names)
    assert_nothing_delivered(tls_collector, t, len(names))


def test_plain_http_to_tls_receiver_is_not_delivered(tls_collector: Collector) -> None:
    t = export(tls_config(tls_collector, endpoint="http://x"), ["plain"])
    assert value(t, "sent_items", signal="traces") == 0
    assert tls_collector.spans() == []


def test_mtls_with_client_cert_delivers(mtls_collector: Collector, pki: dict[str, Path]) -> None:
    names = [f"mtls-http-{i}" for i in range(5)]
    t = export(tls_config(mtls_collector, ca_file=str(pki["ca.crt"]), cert_file=str(pki["client.crt"]),
                          key_file=str(pki["client.key"])), names)
    assert value(t, "sent_items", signal="traces") == 5
    assert delivered(mtls_collector, names) == Counter(names)


def test_mtls_without_client_cert_is_rejected(mtls_collector: Collector, pki: dict[str, Path]) -> None:
    names = [f"anon-http-{i}" for i in range(3)]
    t = export(tls_config(mtls_collector, ca_file=str(pki["ca.crt"])), names)
    assert_nothing_delivered(mtls_collector, t, len(names))


def test_mtls_with_client_cert_from_other_ca_is_rejected(mtls_collector: Collector,
                                                          pki: dict[str, Path], tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other-pki")
    t = export(tls_config(mtls_collector, ca_file=str(pki["ca.crt"]), cert_file=str(other["client.crt"]),
                          key_file=str(other["client.key"])), ["foreign"])
    assert_nothing_delivered(mtls_collector, t, 1)
