"""Reading a configuration: YAML from a file, the standard OTEL_* environment variables over it,
and typed building of the sections with every problem named by its key path. Knows the schema
only through the dataclasses it is handed."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from ..errors import ConfigError
from .forms import PARSERS, Kind, type_name

__all__ = ["read_yaml", "apply_environment", "build"]


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's top-level mapping, or one ``ConfigError`` saying why it is not one."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); "
                          "a config file is YAML") from None
    import yaml  # here: `profile` and the library build configs from dicts, without PyYAML

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # YAML that parses but cannot be built (a timestamp like 2001-13-45, nesting
        # deeper than the stack): still a problem with the file, not a crash.
        raise ConfigError(f"{path}: not valid YAML: {type(e).__name__}: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded


def _parse_kv_list(text: str) -> dict[str, str]:
    """W3C-baggage-like ``k=v,k2=v2`` (values URL-encoded), as OTEL_* list variables use."""
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(item)
        k, v = item.split("=", 1)
        out[urllib.parse.unquote(k.strip())] = urllib.parse.unquote(v.strip())
    return out


def _apply_exporter_environment(exporter: dict[str, Any], env: typing.Mapping[str, str], prefix: str,
                                problems: list[str], merge_headers: bool = True) -> None:
    """``<prefix>ENDPOINT``, ``PROTOCOL``, ``HEADERS``, ``TIMEOUT`` (ms), ``COMPRESSION``,
    ``INSECURE``, ``CERTIFICATE``, ``CLIENT_CERTIFICATE``, ``CLIENT_KEY`` into ``exporter``."""
    simple = {"ENDPOINT": "endpoint", "PROTOCOL": "protocol", "CERTIFICATE": "ca_file",
              "CLIENT_CERTIFICATE": "cert_file", "CLIENT_KEY": "key_file",
              "COMPRESSION": "compression"}
    for var, key in simple.items():
        if env.get(prefix + var):
            exporter[key] = env[prefix + var].strip()
    if env.get(prefix + "INSECURE"):
        exporter["insecure"] = env[prefix + "INSECURE"].strip().lower() == "true"
    if env.get(prefix + "TIMEOUT"):
        try:
            ms = float(env[prefix + "TIMEOUT"])
            if not 0 < ms < float("inf"):
                raise ValueError
            exporter["timeout"] = ms / 1000.0
        except ValueError:
            problems.append(f"{prefix}TIMEOUT: expected a positive number of milliseconds")
    if env.get(prefix + "HEADERS"):
        try:
            headers = _parse_kv_list(env[prefix + "HEADERS"])
            exporter["headers"] = {**(exporter.get("headers") or {}), **headers} if merge_headers else headers
        except ValueError:
            problems.append(f"{prefix}HEADERS: expected key=value pairs separated by commas")


def apply_environment(data: dict[str, Any], env: typing.Mapping[str, str],
                       problems: list[str]) -> dict[str, Any]:
    data = dict(data)
    exporter = dict(data.get("exporter") or {}) if isinstance(data.get("exporter", {}), dict) else data.get("exporter")
    resource = dict(data.get("resource") or {}) if isinstance(data.get("resource", {}), dict) else data.get("resource")
    if isinstance(exporter, dict):
        _apply_exporter_environment(exporter, env, "OTEL_EXPORTER_OTLP_", problems)
        # Per-signal variables, as the specification names them (PROFILES beside the three).
        for signal in ("traces", "metrics", "logs", "profiles"):
            section = exporter.get(signal) or {}
            if isinstance(section, dict):
                section = dict(section)
                _apply_exporter_environment(section, env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_",
                                            problems, merge_headers=False)
                if section:
                    exporter[signal] = section
        data["exporter"] = exporter
    if isinstance(resource, dict):
        if env.get("OTEL_RESOURCE_ATTRIBUTES"):
            try:
                resource["attributes"] = {**(resource.get("attributes") or {}),
                                          **_parse_kv_list(env["OTEL_RESOURCE_ATTRIBUTES"])}
            except ValueError:
                problems.append("OTEL_RESOURCE_ATTRIBUTES: expected key=value pairs separated by commas")
        if env.get("OTEL_SERVICE_NAME"):
            resource["service_name"] = env["OTEL_SERVICE_NAME"]
        data["resource"] = resource
    return data



def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    bad = object()
    result: Any = bad
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        kind = next((m for m in meta if isinstance(m, Kind)), None)
        if kind is None:
            return _convert(base, value, key, problems)   # limits are checked by validate()
        try:
            result = PARSERS[kind.name](value)
        except (ValueError, TypeError):
            pass
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        sub: list[str] = []
        result = _convert(args[0], value, key, sub)
        if sub:
            problems.extend(sub)
            return None
        return result
    elif origin is Literal:
        if value in typing.get_args(tp):
            result = value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            result = {k: str(v) for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build(tp, value, key + ".", problems)
    elif tp is bool:
        if isinstance(value, bool):
            result = value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            result = value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if math.isfinite(value):   # nan and inf (.nan, .inf in YAML) are not settings
                    result = float(value)
            except OverflowError:
                pass
    elif tp is str:
        if isinstance(value, str):
            result = value
    if result is bad:
        problems.append(f"{key}: expected {type_name(tp)}, got {value!r}")
        return None
    return result


def build(cls: Any, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(data) - names, key=str):  # YAML keys may be numbers, dates, ...
        problems.append(f"{prefix}{unknown}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(data):
        before = len(problems)
        value = _convert(hints[name], data[name], prefix + name, problems)
        # A bad field keeps its default (the caller raises anyway); a section keeps its good
        # fields, so their limits are checked too and every problem is named at once.
        if len(problems) == before or dataclasses.is_dataclass(value):
            kwargs[name] = value
    return cls(**kwargs)


