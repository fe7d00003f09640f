"""The text forms configuration values take (durations, sizes, addresses, endpoints) and the
limits numeric fields declare (``Range``): what ``schema`` annotates its fields with, ``loader``
parses with, and ``validate()`` checks."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

__all__ = ["DURATION", "SIZE", "ADDRESS", "ENDPOINT", "Duration", "Size", "Address", "Endpoint", "Range",
           "POSITIVE", "AT_LEAST_1", "parse_duration", "parse_size", "parse_address", "PARSERS", "Kind",
           "type_name", "field_problems"]


class Kind:
    """Marker for ``Annotated`` fields whose text form needs parsing."""

    def __init__(self, name: str, form: str):
        self.name, self.form = name, form


DURATION = Kind("duration", 'a duration such as "500ms", "10s", "5m" or a number of seconds')
SIZE = Kind("size", 'a size such as "4MiB", "512KiB" or a number of bytes')
ADDRESS = Kind("address", 'an address "host:port" with a port from 1 to 65535')
ENDPOINT = Kind("endpoint", 'an endpoint "host:port" or a URL "http(s)://host[:port][/path]"')



@dataclass(frozen=True)
class Range:
    """A numeric field's limits, declared on the field (``Annotated[int, Range(1)]``): checked by
    ``validate()`` for every config, loaded or built in code, so a zero interval never reaches
    a loop."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False     # the bound itself is not allowed
    high_open: bool = False

    def allows(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def describe(self) -> str:
        lo = None if self.low is None else ("greater than " if self.low_open else "at least ") + _number(self.low)
        hi = None if self.high is None else ("less than " if self.high_open else "at most ") + _number(self.high)
        return " and ".join(x for x in (lo, hi) if x)


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)

Duration = Annotated[float, DURATION]
Size = Annotated[int, SIZE]
Address = Annotated[str, ADDRESS]
Endpoint = Annotated[str, ENDPOINT]

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024,
               "mib": 1024**2, "gib": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"1m30s"``, ``"10s"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:   # nan and inf are not durations
            raise ValueError
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise ValueError
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``"4MiB"``, ``"512KiB"``, ``"1MB"`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def parse_address(value: Any) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"`` or ``"[v6]:port"``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s\[\]]*):(\d+)", str(value).strip())
    if not m:
        raise ValueError
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError
    return host, port


def _check_address(value: Any) -> str:
    parse_address(value)
    return str(value).strip()


def _parse_endpoint(value: Any) -> str:
    """``host:port``, or an http/https URL (the port may then be left out; a path is kept for
    OTLP/HTTP)."""
    text = str(value).strip()
    m = re.fullmatch(r"(https?)://([^/?#]+)(/[^?#]*)?", text)
    if m is None:
        parse_address(text)
    elif not re.fullmatch(r"\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+", m.group(2)):
        parse_address(m.group(2))
    return text


PARSERS = {"duration": parse_duration, "size": parse_size, "address": _check_address,
            "endpoint": _parse_endpoint}



def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        kind = next((m for m in meta if isinstance(m, Kind)), None)
        name = kind.form if kind else type_name(base)
        limits = [m.describe() for m in meta if isinstance(m, Range)]
        return name + (f" ({', '.join(limits)})" if limits else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of strings to strings"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))



def field_problems(obj: Any, prefix: str = "") -> list[str]:
    """Every problem of a config section and its subsections: declared field limits first, then
    the section's own cross-field rules (``_validate``)."""
    out = []
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(field_problems(value, f"{prefix}{f.name}."))
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None or typing.get_origin(tp) is not Annotated:
            continue
        for limit in (m for m in typing.get_args(tp)[1:] if isinstance(m, Range)):
            if not limit.allows(value):
                out.append(f"{prefix}{f.name}: must be {limit.describe()}, got {value!r}")
    own = getattr(obj, "_validate", None)
    if own is not None:
        out.extend(prefix + p for p in own())
    return out
