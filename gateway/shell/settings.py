"""config.yaml -> typed, validated settings.

Unknown keys are errors, so that a misspelt security setting never silently
falls back to a default. Paths are resolved against the config file's folder.
The loader is driven by the dataclasses below: each section is a frozen
dataclass whose fields are the only keys accepted, and each field says what it
is for and what values it takes (core/typed.py), which `gateway schema config`
turns into the JSON Schema editors validate the file with.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from gateway.core.errors import SettingsError
from gateway.core.overlaps import find_overlaps
from gateway.core.policy import Policy, PolicySet, parse_policy
from gateway.core.typed import build, json_schema, setting

DEFAULT_CONFIG = "config.yaml"
PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)"
HOST_PORT = r"(\[[0-9A-Fa-f:.]+\]|[^\s\[\]]+):" + PORT   # an IPv6 address with or without brackets


@dataclass(frozen=True)
class Listen:
    """The mTLS front door."""

    host: str = setting("0.0.0.0", "address to listen on (the committed config.yaml: 127.0.0.1, this machine only)")
    port: int = setting(8443, "TCP port", maximum=65535)
    proxy_protocol: bool = setting(False, "true: every connection starts with a PROXY header (v1 or v2) from an "
                                          "address in trusted_proxies (CIDRs)")
    trusted_proxies: tuple[str, ...] = setting(factory=tuple, doc="the load balancers allowed to send PROXY headers "
                                                                  "(CIDRs, e.g. 10.0.0.0/8 or 192.0.2.7/32)")


@dataclass(frozen=True)
class Admin:
    """The admin port: /metrics, /healthz, /readyz (plain HTTP: keep it off the public network)."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(9102, "TCP port", maximum=65535)


@dataclass(frozen=True)
class Revocation:
    """Online revocation: OCSP, and CRLs fetched from their distribution points (besides or instead of tls.crl)."""

    ocsp: str = setting("off", "leaf | chain: ask the OCSP responder named in each certificate's AIA (or ocsp_url) "
                               "and refuse what it says is revoked", choices=("off", "leaf", "chain"))
    ocsp_url: str | None = setting(None, "one OCSP responder for all, overriding the certificates' AIA",
                                   pattern=r"https?://\S+", pattern_message="must be an http:// or https:// URL")
    ocsp_max_age_s: float = setting(300.0, "a good answer is reused at most this long (and never past its "
                                           "nextUpdate)")
    crl_fetch: bool = setting(False, "fetch CRLs from the CRL distribution points of the certificates (or "
                                     "crl_urls), verify them, keep the last good one")
    crl_urls: tuple[str, ...] = setting(factory=tuple, doc="CRLs to fetch besides the certificates' distribution "
                                                           "points (http:// URLs of DER or PEM CRLs)")
    refresh_s: float = setting(300.0, "refetch CRLs this often, and at once when the CRL in force passes its "
                                      "nextUpdate")
    cache_dir: Path = setting(Path("data/revocation"), "the last good CRLs and OCSP answers, kept across restarts")
    on_unavailable: str = setting("deny", "when no fresh status can be had (responder down, CRL unreachable and "
                                          "stale): deny (403) or allow (the audit line says so)",
                                  choices=("deny", "allow"))

    @property
    def enabled(self) -> bool:
        return self.ocsp != "off" or self.crl_fetch


@dataclass(frozen=True)
class TLS:
    """The front door's certificate and the client certificates it accepts (reloaded on change)."""

    cert: Path | None = setting(None, "the gateway's server certificate (PEM; a chain may follow it)")
    key: Path | None = setting(None, "the server certificate's private key (PEM)")
    key_password_file: Path | None = setting(None, "a file holding the passphrase of an encrypted key "
                                                   "(never an interactive prompt)")
    client_ca: Path | None = setting(None, "CAs trusted for client certificates (PEM bundle; intermediates allowed)")
    crl: Path | None = setting(None, "CRLs (PEM): revoked client certificates are refused")
    crl_check: str = setting("leaf", "leaf: the client certificate's CRL; chain: a CRL for every CA of the chain",
                             choices=("leaf", "chain"))
    min_version: str = setting("TLSv1.2", "the oldest TLS version accepted", choices=("TLSv1.2", "TLSv1.3"))
    x509_strict: bool = setting(False, "also refuse certificates that break RFC 5280's encoding rules")
    revocation: Revocation = setting(factory=Revocation)


@dataclass(frozen=True)
class Reload:
    """Picking up changed files without a signal."""

    watch_s: float = setting(5.0, "re-read the TLS files, config.yaml and the policies every N seconds and "
                                  "reload when they changed, as SIGHUP does (0: SIGHUP only)", minimum=0)


@dataclass(frozen=True)
class Upstream:
    """Where allowed calls go."""

    url: str = setting("embedded", "embedded (the reference API, run and supervised by the gateway) or the "
                                   "http(s):// URL of a Signing Workflow server",
                       pattern=r"embedded|https?://.+", pattern_message="must be 'embedded' or an http(s):// URL")
    timeout_s: float = setting(30.0, "time for a free connection, connecting and the answer's head (else 504)")
    keepalive_s: float = setting(10.0, "idle upstream connections older than this are not reused "
                                       "(keep it below the upstream's own keep-alive timeout)")
    max_connections: int = setting(100, "open upstream connections at most; callers past it wait", minimum=1)
    ca: Path | None = setting(None, "https upstream: CA bundle (PEM) to verify it (default: the system's trust store)")
    cert: Path | None = setting(None, "https upstream wanting mutual TLS: the gateway's client certificate (PEM)")
    key: Path | None = setting(None, "upstream.cert's private key (PEM, unencrypted: it has no passphrase file)")
    server_name: str | None = setting(None, "the name to verify in the upstream's certificate (and send as SNI), "
                                            "when not the URL's host", pattern=r"[^\s/]+",
                                 pattern_message="must be a host name")


@dataclass(frozen=True)
class IdentityToken:
    """A short-lived signed JWT naming the client, sent upstream in X-Identity-Token."""

    key: Path | None = setting(None, "EC P-256 or Ed25519 private key (PEM) that signs the tokens; "
                                     "created when missing")
    key_password_file: Path | None = setting(None, "a file holding the passphrase of an encrypted key "
                                                   "(never an interactive prompt)")
    audience: str = setting("automation-api", "the tokens' aud claim")
    ttl_s: int = setting(60, "the tokens' lifetime in seconds", minimum=1)


@dataclass(frozen=True)
class ReferenceLdap:
    """The LDAP user directory's connection, when reference_api.directory is an ldap:// or ldaps:// URL."""

    bind_dn: str | None = setting(None, "the DN the reference API binds as (default: an anonymous bind)")
    password_file: Path | None = setting(None, "a file holding bind_dn's password (required with bind_dn)")
    ca: Path | None = setting(None, "ldaps://: CA bundle (PEM) that verifies the server (default: the system's "
                                    "trust store)")
    timeout_s: float = setting(5.0, "seconds to connect and to wait for each answer; past it a look-up answers 503")


@dataclass(frozen=True)
class ReferenceAPI:
    """The embedded reference Automation API (used when upstream.url is embedded)."""

    listen: str = setting("127.0.0.1:8081", "HOST:PORT it listens on (plain HTTP)", pattern=HOST_PORT,
                          pattern_message="is not HOST:PORT")
    data_dir: Path = setting(Path("data"), "its SQLite database and signing key (made 0700)")
    directory: str | None = setting(None, "the user directory that INTERNAL identifiers are looked up in: a YAML "
                                          "file, or an LDAP directory ldap[s]://host:port/BASE-DN",
                                    pattern=r".+", pattern_message="must be a YAML file or an ldap[s]:// URL")
    ldap: ReferenceLdap = setting(factory=ReferenceLdap)
    timezone: str = setting("Europe/Stockholm", "the time zone a dueDate (which has none) is read in")
    signing_cert: Path | None = setting(None, "certificate of the key that signs documents (default: made in "
                                              "data_dir on first start)")
    signing_key: Path | None = setting(None, "the key that signs documents (default: made in data_dir)")
    identity_token_public_key: Path | None = setting(None, "public key (PEM) that verifies identity tokens "
                                                           "(default: derived from identity_token.key)")


@dataclass(frozen=True)
class Audit:
    """The tamper-evident audit log: one JSON line a request."""

    path: Path = setting(Path("data/audit.jsonl"), "the log file (created 0600); `--workers N` adds .w<i>")
    key_file: Path | None = setting(None, "HMAC key (at least 16 bytes) of the hash chain: without it anyone "
                                          "who can write the file can recompute the chain")
    redact: tuple[str, ...] = setting(factory=tuple, doc="dotted fields written as a keyed hash instead of in "
                                                         "clear, e.g. solicitor.identifier")
    sync: str = setting("answer", "answer: a line is on disk (fsync) before its answer's first byte; batch: "
                                  "written within 10 ms", choices=("answer", "batch"))


@dataclass(frozen=True)
class RateLimit:
    """Where rate-limit state lives (the limits themselves are in the policies)."""

    storage: str = setting("memory", "memory (one process) or redis://host:port/db (shared by gateways)")
    on_storage_error: str = setting("deny", "when Redis cannot be reached: deny (503) or allow",
                                    choices=("deny", "allow"))


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients may send and hold open."""

    max_body_bytes: int = setting(33554432, "the largest request body (413 past it)")
    header_timeout_s: float = setting(10.0, "time for the TLS handshake and for each request's headers")
    request_timeout_s: float = setting(120.0, "time for a whole request")
    drain_timeout_s: float = setting(30.0, "SIGTERM: how long requests in flight may still take")
    max_connections: int = setting(10000, "open client connections at most; past it new ones are closed at once",
                                   minimum=1)


@dataclass(frozen=True)
class Config:
    """The gateway's configuration (config.yaml). Paths are relative to this file's folder."""

    file: Path = setting(Path(DEFAULT_CONFIG), key=False)
    listen: Listen = setting(factory=Listen)
    admin: Admin = setting(factory=Admin)
    tls: TLS = setting(factory=TLS)
    reload: Reload = setting(factory=Reload)
    policies: Path = setting(Path("policies"), "the folder of policy files, one a client")
    upstream: Upstream = setting(factory=Upstream)
    identity_token: IdentityToken | None = setting(None, "off when absent")
    reference_api: ReferenceAPI = setting(factory=ReferenceAPI)
    audit: Audit = setting(factory=Audit)
    rate_limit: RateLimit = setting(factory=RateLimit)
    limits: Limits = setting(factory=Limits)


def config_schema() -> dict:
    """The JSON Schema of config.yaml, from the same fields the loader reads."""
    return json_schema(Config, "gateway config.yaml")


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
    config = build(Config, data, file, base)
    config = dataclasses.replace(config, reference_api=_reference_directory(config.reference_api, file, base))
    _check_upstream_tls(config.upstream, file)
    _check_proxy_protocol(config.listen, file)
    return dataclasses.replace(config, file=file.resolve())


def _reference_directory(ref: ReferenceAPI, file: Path, base: Path) -> ReferenceAPI:
    """reference_api.directory: an ldap[s]:// URL as written (checked), else a path from the config's folder."""
    if ref.directory is None:
        return ref
    if ref.ldap.bind_dn is not None and ref.ldap.password_file is None:
        raise SettingsError(file, "reference_api.ldap.password_file", "is required with reference_api.ldap.bind_dn")
    if ref.ldap.password_file is not None and ref.ldap.bind_dn is None:
        raise SettingsError(file, "reference_api.ldap.bind_dn", "is required with reference_api.ldap.password_file")
    if ref.directory.lower().startswith(("ldap://", "ldaps://")):
        url = urlsplit(ref.directory)
        try:
            url.port
        except ValueError:
            raise SettingsError(file, "reference_api.directory", f"{ref.directory!r}: the port is no number") from None
        if not url.hostname or not unquote(url.path.lstrip("/")) or url.query or url.fragment:
            raise SettingsError(file, "reference_api.directory", f"{ref.directory!r} is not "
                                                                 "ldap[s]://host:port/BASE-DN")
        return ref
    if "://" in ref.directory:
        raise SettingsError(file, "reference_api.directory", f"{ref.directory!r}: only ldap:// and ldaps:// "
                                                             "URLs are directories (or a YAML file's path)")
    return dataclasses.replace(ref, directory=str(base / ref.directory))


def _check_proxy_protocol(listen: Listen, file: Path) -> None:
    """listen.trusted_proxies are CIDRs, and proxy_protocol needs at least one (else every connection is refused)."""
    for i, text in enumerate(listen.trusted_proxies):
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise SettingsError(file, f"listen.trusted_proxies[{i}]", f"{text!r} is no CIDR (e.g. 10.0.0.0/8)") from None
    if listen.proxy_protocol and not listen.trusted_proxies:
        raise SettingsError(file, "listen.trusted_proxies", "is required with listen.proxy_protocol: true "
                                                            "(the load balancers' addresses)")


def _check_upstream_tls(upstream: Upstream, file: Path) -> None:
    """upstream.cert and .key go together, and the TLS keys mean something for an https:// upstream only
    (silently ignoring a CA meant to pin the upstream would be worse than refusing to start)."""
    if upstream.cert is not None and upstream.key is None:
        raise SettingsError(file, "upstream.key", "is required with upstream.cert (the client certificate's key)")
    if upstream.key is not None and upstream.cert is None:
        raise SettingsError(file, "upstream.cert", "is required with upstream.key (the key's client certificate)")
    if not upstream.url.startswith("https://"):
        for name in ("ca", "cert", "key", "server_name"):
            if getattr(upstream, name) is not None:
                raise SettingsError(file, f"upstream.{name}", f"only applies to an https:// upstream "
                                                              f"(upstream.url is {upstream.url})")


def parse_host_port(text: str, file: str | os.PathLike = "", key: str = "") -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise SettingsError(file, key, f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# -- policy files ---------------------------------------------------------------


def load_policies(folder: Path) -> PolicySet:
    """Every policies/*.yaml file; the first problem raises SettingsError (a reload then keeps the old set)."""
    policies, problems = read_policies(folder)
    if problems:
        raise problems[0]
    return PolicySet(policies)


def check_policies(folder: Path) -> list[SettingsError]:
    """Every problem in the policy folder, for `gateway check`."""
    return read_policies(folder)[1]


def read_policies(folder: Path) -> tuple[list[Policy], list[SettingsError]]:
    """The policies that parse, and every problem: a file that does not, a client named twice, and two
    policies one certificate could match (core.overlaps.find_overlaps), named by both files."""
    if not folder.is_dir():
        return [], [SettingsError(folder, "", "is not a folder of policy files")]
    problems: list[SettingsError] = []
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    for f in sorted(folder.glob("*.yaml")):
        try:
            policy = _load_file(f)
        except SettingsError as exc:
            problems.append(exc)
            continue
        policies.append(policy)
        if policy.client in seen:
            problems.append(SettingsError(f, "client", f"{policy.client!r} is also the client of {seen[policy.client]}"))
        seen.setdefault(policy.client, str(f))
    for a, b in find_overlaps(policies):
        problems.append(SettingsError(b.file, "match", f"a certificate could match both this policy (client "
                                      f"{b.client}) and {a.file} (client {a.client}): tell them apart by "
                                      "issuer, or by a subject, common_name or fingerprint_sha256 of their own"))
    return policies, problems


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
