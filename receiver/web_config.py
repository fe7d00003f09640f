"""TLS and basic auth for the telemetry endpoint, from a web config file in the format of the
Prometheus exporters (prometheus/exporter-toolkit), so the same file and the same Prometheus
scrape config work::

    tls_server_config:
      cert_file: server.crt          # relative paths: to this file's directory
      key_file: server.key
      client_ca_file: ca.crt         # optional: with client_auth_type, mutual TLS
      client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default)
      min_version: TLS12             # TLS10..TLS13 (default TLS12)
    basic_auth_users:                # user: bcrypt hash (htpasswd -nBC 10 user)
      prometheus: $2y$10$...

Basic auth, when set, covers every path (/metrics, /healthz, /readyz), as in the exporters.
Checked passwords are remembered (by SHA-256) so a scrape does not pay bcrypt's cost each time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["WebConfig"]

_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
                "RequireAnyClientCert": ssl.CERT_REQUIRED, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)   # user → bcrypt hash
    _checked: OrderedDict[tuple[str, bytes], bool] = field(default_factory=OrderedDict)

    @classmethod
    def load(cls, path: str) -> WebConfig:
        where = f"web_config_file {path}"
        try:
            data = yaml.safe_load(Path(path).read_bytes().decode("utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
        except (UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
            raise ConfigError(f"{where}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the top level must be a mapping")
        unknown = set(data) - {"tls_server_config", "basic_auth_users", "http_server_config"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(map(str, unknown))}")
        base = Path(path).resolve().parent
        config = cls()
        if data.get("tls_server_config"):
            config.ssl_context = _tls_context(data["tls_server_config"], base, where)
        users = data.get("basic_auth_users") or {}
        if not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in users.items()):
            raise ConfigError(f"{where}: basic_auth_users must map user names to bcrypt hashes")
        for user, hashed in users.items():
            if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ConfigError(f"{where}: basic_auth_users.{user}: not a bcrypt hash")
        config.users = {u: h.encode() for u, h in users.items()}
        return config

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries a configured user and its password."""
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        ok = self._checked.get(key)
        if ok is None:
            import bcrypt

            ok = bcrypt.checkpw(password.encode(), hashed)
            self._checked[key] = ok
            if len(self._checked) > 64:
                self._checked.popitem(last=False)
        return ok


def _tls_context(tls: Any, base: Path, where: str) -> ssl.SSLContext:
    if not isinstance(tls, dict) or not tls.get("cert_file") or not tls.get("key_file"):
        raise ConfigError(f"{where}: tls_server_config needs cert_file and key_file")

    def resolve(p: str) -> str:
        return str(base / p)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = tls.get("min_version", "TLS12")
    if version not in _TLS_VERSIONS:
        raise ConfigError(f"{where}: min_version: one of {', '.join(_TLS_VERSIONS)}")
    ctx.minimum_version = _TLS_VERSIONS[version]
    try:
        ctx.load_cert_chain(resolve(tls["cert_file"]), resolve(tls["key_file"]))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{where}: cannot load cert_file/key_file: {e}") from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise ConfigError(f"{where}: client_auth_type: one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if tls.get("client_ca_file"):
        try:
            ctx.load_verify_locations(resolve(tls["client_ca_file"]))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{where}: cannot load client_ca_file: {e}") from None
    elif auth == "RequireAndVerifyClientCert":
        raise ConfigError(f"{where}: RequireAndVerifyClientCert needs client_ca_file")
    return ctx
