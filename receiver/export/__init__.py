"""Export to the Collector over OTLP/gRPC or OTLP/HTTP: one queue → batch → retry machinery
(``exporter``) around two push functions (``otlp_grpc``, ``otlp_http``)."""

from .exporter import OtlpExporter, OtlpGrpcExporter, OtlpHttpExporter
from .signals import count_items, split_request

__all__ = ["OtlpExporter", "OtlpGrpcExporter", "OtlpHttpExporter", "count_items", "split_request"]
