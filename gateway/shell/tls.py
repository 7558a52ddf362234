"""The front door's TLS context: server certificate, client CA bundle, CRL.

Client certificates are required and verified by OpenSSL during the handshake:
chain to `tls.client_ca`, validity period, the clientAuth purpose (OpenSSL's
SSL-client purpose check on the server side) and, when `tls.crl` is set, the
CRL of the leaf (`crl_check: leaf`) or of every certificate in the chain
(`chain`). A context is built whole and checked before it is used, so that a
reload can swap it in at once or keep the old one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.core.errors import SettingsError
from gateway.shell.keys import load_private_key, password_callback, read_password
from gateway.shell.settings import Config
from gateway.core.credentials import CRLView, Trust

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo   # a public key, as bytes


@dataclass(frozen=True)
class Expiry:
    """Expiry facts for metrics: certificate label -> UNIX time."""

    times: dict[str, float]
    crl_this_update: dict[str, float] = None   # CRL label -> its lastUpdate: CRL warnings are relative to the period

    def __post_init__(self) -> None:
        if self.crl_this_update is None:
            object.__setattr__(self, "crl_this_update", {})


def _need(config: Config, key: str) -> Path:
    path = getattr(config.tls, key)
    if path is None:
        raise SettingsError(config.file, f"tls.{key}", "is required")
    if not Path(path).is_file():
        raise SettingsError(config.file, f"tls.{key}", f"{path} does not exist")
    return Path(path)


@dataclass(frozen=True)
class CRLFacts:
    """What the CRL file says, read with cryptography (OpenSSL enforces it; this explains it)."""

    revoked: frozenset[tuple[str, int]]     # (issuer RFC 4514, serial)
    next_update: float | None               # the earliest nextUpdate of the file's CRLs
    issuers: frozenset[str]
    next_update_by_issuer: dict[str, float | None]

    def view(self) -> CRLView:
        return CRLView(self.revoked, self.next_update_by_issuer)


_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def load_crls(path: Path, file: str | Path = "", strict: bool = True) -> list[x509.CertificateRevocationList]:
    """Every PEM CRL in the file. Strict: a file without one, or one that does not parse, is a
    SettingsError; otherwise those are skipped (gateway check reports them through check_crl)."""
    crls = []
    for block in _CRL_BLOCK.findall(Path(path).read_bytes()):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError:
            if strict:
                raise SettingsError(file, "tls.crl", f"{path} holds a CRL that does not parse") from None
    if strict and not crls:
        raise SettingsError(file, "tls.crl", f"{path} holds no PEM CRL")
    return crls


def read_crls(path: Path, file: str | Path = "") -> CRLFacts:
    revoked, updates, issuers = set(), [], set()
    by_issuer: dict[str, float | None] = {}   # the earliest stated nextUpdate of each issuer's CRLs
    for crl in load_crls(path, file):
        issuer = crl.issuer.rfc4514_string()
        issuers.add(issuer)
        revoked.update((issuer, r.serial_number) for r in crl)
        if crl.next_update_utc is None:
            by_issuer.setdefault(issuer, None)
            continue
        due = crl.next_update_utc.timestamp()
        updates.append(due)
        known = by_issuer.get(issuer)
        by_issuer[issuer] = due if known is None else min(known, due)
    return CRLFacts(frozenset(revoked), min(updates) if updates else None, frozenset(issuers), by_issuer)


def check_crl(config: Config) -> CRLFacts | None:
    """The CRL facts; a chain check needs a CRL for every CA of the bundle. Raises SettingsError."""
    tls = config.tls
    if tls.crl is None:
        if tls.crl_check == "chain":
            raise SettingsError(config.file, "tls.crl", "crl_check: chain needs tls.crl with a CRL for every CA")
        return None
    facts = read_crls(_need(config, "crl"), config.file)
    if tls.crl_check == "chain":
        cas = x509.load_pem_x509_certificates(_need(config, "client_ca").read_bytes())
        missing = [ca.subject.rfc4514_string() for ca in cas if ca.subject.rfc4514_string() not in facts.issuers]
        if missing:
            raise SettingsError(config.file, "tls.crl",
                                f"crl_check: chain needs a CRL for every CA in tls.client_ca; none for {'; '.join(missing)}")
    return facts


def crl_is_stale(facts: CRLFacts | None, now: float) -> bool:
    """A CRL past its nextUpdate: OpenSSL then refuses every client until a fresh one is loaded."""
    return facts is not None and facts.next_update is not None and facts.next_update < now


def server_context(config: Config) -> ssl.SSLContext:
    tls = config.tls
    cert, key, cas = _need(config, "cert"), _need(config, "key"), _need(config, "client_ca")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    password = read_password(tls.key_password_file, config.file, "tls.key_password_file")
    private = load_private_key(key, password, config.file, "tls.key", "tls.key_password_file")
    _check_pair(config, cert, private)
    try:
        ctx.load_cert_chain(cert, key, password=password_callback(password, key, config.file, "tls.key",
                                                                  "tls.key_password_file"))
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(config.file, "tls.cert/tls.key",
                            f"{cert} and {key} cannot be used together ({exc.__class__.__name__})") from None
    try:
        ctx.load_verify_locations(cafile=str(cas))
    except (ssl.SSLError, OSError):
        raise SettingsError(config.file, "tls.client_ca", f"{cas} holds no usable CA certificate") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    check_crl(config)
    if tls.crl is not None:
        crl = _need(config, "crl")
        try:
            ctx.load_verify_locations(cafile=str(crl))
        except (ssl.SSLError, OSError):
            raise SettingsError(config.file, "tls.crl", f"{crl} is not a PEM CRL") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN if tls.crl_check == "chain" else ssl.VERIFY_CRL_CHECK_LEAF
    if tls.x509_strict:  # off by default, as in nginx, Envoy and HAProxy: see x509_rules.py
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _check_pair(config: Config, cert: Path, private, section: str = "tls") -> None:
    """The key must be the certificate's (a rotation that replaces the two files one at a time is caught
    here, with a message that says so, before OpenSSL's own check). `section`: tls or upstream."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise SettingsError(config.file, f"{section}.cert", f"cannot read {cert}: {exc.strerror or exc}") from None
    except ValueError:
        raise SettingsError(config.file, f"{section}.cert", f"{cert} is not a PEM certificate") from None
    if leaf.public_key().public_bytes(*SPKI) != private.public_key().public_bytes(*SPKI):
        raise SettingsError(config.file, f"{section}.cert/{section}.key",
                            f"{cert} and {getattr(config, section).key} do not belong together "
                            "(the key is not the certificate's)")


def load_trust(config: Config, crl: CRLFacts | None) -> Trust:
    """The client CAs and CRLs the per-request credential check holds connections to."""
    cas = tuple(x509.load_pem_x509_certificates(_need(config, "client_ca").read_bytes()))
    return Trust(cas, crl.view() if crl is not None else None, config.tls.crl_check)


def expiry(config: Config) -> Expiry:
    """Expiry times of the server certificate, each client CA and the CRL's next update."""
    tls = config.tls
    times: dict[str, float] = {}
    if tls.cert and Path(tls.cert).is_file():
        times["server"] = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes()).not_valid_after_utc.timestamp()
    if tls.client_ca and Path(tls.client_ca).is_file():
        for ca in x509.load_pem_x509_certificates(Path(tls.client_ca).read_bytes()):
            times[f"client_ca:{ca.subject.rfc4514_string()}"] = ca.not_valid_after_utc.timestamp()
    if tls.crl and Path(tls.crl).is_file():
        try:
            facts = read_crls(Path(tls.crl))
        except SettingsError:
            facts = None
        if facts is not None and facts.next_update is not None:
            times["crl_next_update"] = facts.next_update
            due = [c for c in load_crls(Path(tls.crl), strict=False)
                   if c.next_update_utc is not None and c.next_update_utc.timestamp() == facts.next_update]
            if due:
                return Expiry(times, {"crl_next_update": due[0].last_update_utc.timestamp()})
    return Expiry(times)


# The committed example PKI's public keys (SHA-256 of the SubjectPublicKeyInfo): their private keys are
# in the repository. A certificate is matched by its key, so one re-issued from the same key counts too.
EXAMPLE_CA_KEY = "11d833af51423cf00d238fcd03962ca7b589bf1fb5a32dc0ff1c8c061085fa34"
EXAMPLE_SERVER_KEY = "7581ca1af48f7072c99c47a23492e1c3c157b766a30438c93deffb8890161621"


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume the network can reach it


def _key_ids(path: Path | None) -> set[str]:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes()) if path else []
    except (OSError, ValueError):
        return set()  # what is wrong with the file is said elsewhere
    return {hashlib.sha256(c.public_key().public_bytes(*SPKI)).hexdigest() for c in certs}


def example_keys_exposed(config: Config) -> list[str]:
    """Why the front door is open to anyone: it listens beyond loopback with a key of the committed example PKI."""
    if is_loopback(config.listen.host):
        return []
    where = f"{config.listen.host} is reachable from the network"
    found = []
    if EXAMPLE_CA_KEY in _key_ids(config.tls.client_ca):
        found.append(f"{where} and tls.client_ca trusts the committed example CA, whose private key is public: "
                     "anyone can mint a client certificate for it. Listen on 127.0.0.1, or use your own CA")
    if EXAMPLE_SERVER_KEY in _key_ids(config.tls.cert):
        found.append(f"{where} and tls.cert is the committed example server certificate, whose private key is "
                     "public: anyone can pose as this gateway. Listen on 127.0.0.1, or use a key of your own")
    return found
