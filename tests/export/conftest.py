"""The TLS Collector fixtures of test_tls_and_outage.py, shared with the OTLP/HTTP TLS tests."""

from .test_tls_and_outage import mtls_collector, pki, tls_collector

__all__ = ["mtls_collector", "pki", "tls_collector"]
