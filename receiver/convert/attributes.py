"""Python values and attribute dicts as OTLP ``AnyValue``/``KeyValue``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

__all__ = ["to_any_value", "to_key_values"]


def to_any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[to_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def to_key_values(attributes: Mapping[str, Any]) -> list[KeyValue]:
    """Attributes as OTLP ``KeyValue``s, skipping ``None`` values."""
    return [KeyValue(key=k, value=to_any_value(v)) for k, v in attributes.items() if v is not None]
