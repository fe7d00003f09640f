"""Export to the Collector over OTLP/gRPC."""

from .otlp_grpc import OtlpGrpcExporter

__all__ = ["OtlpGrpcExporter"]
