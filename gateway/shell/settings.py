"""config.yaml -> typed, validated settings.

Unknown keys are errors, so that a misspelt security setting never silently
falls back to a default. Paths are resolved against the config file's folder.
The loader is driven by the dataclasses below: each section is a frozen
dataclass whose fields are the only keys accepted.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.core.errors import SettingsError
from gateway.core.policy import PolicySet, Policy, parse_policy

DEFAULT_CONFIG = "config.yaml"



@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8443


@dataclass(frozen=True)
class Admin:
    host: str = "127.0.0.1"
    port: int = 9102


@dataclass(frozen=True)
class TLS:
    cert: Path | None = None
    key: Path | None = None
    key_password_file: Path | None = None   # the passphrase of an encrypted key (never a prompt)
    client_ca: Path | None = None
    crl: Path | None = None
    crl_check: str = "leaf"
    min_version: str = "TLSv1.2"
    x509_strict: bool = False          # true: also refuse certificates that break RFC 5280's encoding rules


@dataclass(frozen=True)
class Reload:
    watch_s: float = 5.0               # re-check TLS and policy files every N s, reload on change (0: SIGHUP only)


@dataclass(frozen=True)
class Upstream:
    url: str = "embedded"
    timeout_s: float = 30.0
    keepalive_s: float = 10.0          # idle upstream connections older than this are not reused
    max_connections: int = 100         # open upstream connections at most; callers past it wait


@dataclass(frozen=True)
class IdentityToken:
    key: Path | None = None
    key_password_file: Path | None = None   # the passphrase of an encrypted key (never a prompt)
    audience: str = "automation-api"
    ttl_s: int = 60


@dataclass(frozen=True)
class ReferenceAPI:
    listen: str = "127.0.0.1:8081"
    data_dir: Path = Path("data")
    directory: Path | None = None
    timezone: str = "Europe/Stockholm"
    signing_cert: Path | None = None
    signing_key: Path | None = None
    # Public key (PEM) that verifies identity tokens; derived from
    # identity_token.key when that is set and this is not.
    identity_token_public_key: Path | None = None


@dataclass(frozen=True)
class Audit:
    path: Path = Path("data/audit.jsonl")
    key_file: Path | None = None
    redact: tuple[str, ...] = ()
    sync: str = "answer"               # answer: a line is on disk before its answer's first byte; batch: within 10 ms


@dataclass(frozen=True)
class RateLimit:
    storage: str = "memory"
    on_storage_error: str = "deny"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 33554432
    header_timeout_s: float = 10.0
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0      # SIGTERM: how long in-flight requests may still take
    max_connections: int = 10000       # open client connections at most; past it new ones are closed at once


@dataclass(frozen=True)
class Config:
    file: Path = Path(DEFAULT_CONFIG)
    listen: Listen = field(default_factory=Listen)
    admin: Admin = field(default_factory=Admin)
    tls: TLS = field(default_factory=TLS)
    reload: Reload = field(default_factory=Reload)
    policies: Path = Path("policies")
    upstream: Upstream = field(default_factory=Upstream)
    identity_token: IdentityToken | None = None
    reference_api: ReferenceAPI = field(default_factory=ReferenceAPI)
    audit: Audit = field(default_factory=Audit)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    limits: Limits = field(default_factory=Limits)


_ZERO_ALLOWED = {"reload.watch_s"}
_CHOICES = {
    "tls.crl_check": ("leaf", "chain"),
    "tls.min_version": ("TLSv1.2", "TLSv1.3"),
    "rate_limit.on_storage_error": ("deny", "allow"),
    "audit.sync": ("answer", "batch"),
}


def _convert(value: Any, tp: Any, where: str, file: Path, base: Path) -> Any:
    """Convert one YAML value to the field type `tp`, or raise SettingsError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where, file, base)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise SettingsError(file, where, "must be a mapping")
        return _build(tp, value, where, file, base)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise SettingsError(file, where, "must be a non-empty path")
        path = Path(value)
        return path if path.is_absolute() else base / path
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(file, where, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SettingsError(file, where, "must be a non-negative integer")
        return value
    if tp is float:
        if where in _ZERO_ALLOWED:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise SettingsError(file, where, "must be a number, 0 or more")
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SettingsError(file, where, "must be a positive number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(file, where, "must be a string")
        allowed = _CHOICES.get(where)
        if allowed and value not in allowed:
            raise SettingsError(file, where, f"must be one of {', '.join(allowed)}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(file, where, "must be a list of strings")
        return tuple(value)
    raise SettingsError(file, where, f"unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str, file: Path, base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"file"}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise SettingsError(file, where, "unknown key")
        kwargs[key] = _convert(value, hints[key], where, file, base)
    # Relative defaults are relative to the config file's folder too.
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and hints[f.name] is Path and f.default is not dataclasses.MISSING:
            kwargs[f.name] = base / f.default
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate a config file (`-c`, else $GATEWAY_CONFIG, else ./config.yaml)."""
    file = Path(path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(file, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SettingsError(file, "", f"not valid YAML{at}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(file, "", "must be a mapping of sections")
    base = file.resolve().parent
    config = _build(Config, data, "", file, base)
    config = dataclasses.replace(config, file=file.resolve())
    if config.upstream.url != "embedded" and not config.upstream.url.startswith(("http://", "https://")):
        raise SettingsError(file, "upstream.url", "must be 'embedded' or an http(s):// URL")
    parse_host_port(config.reference_api.listen, file, "reference_api.listen")
    for key, value in (("upstream.max_connections", config.upstream.max_connections),
                       ("limits.max_connections", config.limits.max_connections)):
        if value < 1:
            raise SettingsError(file, key, "must be at least 1")
    return config


def parse_host_port(text: str, file: str | os.PathLike = "", key: str = "") -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise SettingsError(file, key, f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# -- policy files ---------------------------------------------------------------


def load_policies(folder: Path) -> PolicySet:
    """Every policies/*.yaml file; the first problem raises SettingsError."""
    problems = check_policies(folder)
    if problems:
        raise problems[0]
    return PolicySet([_load_file(f) for f in sorted(folder.glob("*.yaml"))])


def check_policies(folder: Path) -> list[SettingsError]:
    """Every problem in the policy folder, for `gateway check`."""
    if not folder.is_dir():
        return [SettingsError(folder, "", "is not a folder of policy files")]
    problems: list[SettingsError] = []
    seen: dict[str, str] = {}
    for f in sorted(folder.glob("*.yaml")):
        try:
            policy = _load_file(f)
        except SettingsError as exc:
            problems.append(exc)
            continue
        if policy.client in seen:
            problems.append(SettingsError(f, "client", f"{policy.client!r} is also the client of {seen[policy.client]}"))
        seen.setdefault(policy.client, str(f))
    return problems


def read_yaml(path: Path) -> Any:
    """A YAML file's data; SettingsError naming the file when it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SettingsError(path, "", "not valid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None


def _load_file(path: Path) -> Policy:
    return parse_policy(read_yaml(path), str(path))
