"""`gateway policy explain`: what the gateway would do with one request, without sending it.

The certificate is first checked as the front door checks it, so that explain never
allows what serving refuses: the chain to `tls.client_ca` (with any certificates
after the leaf in the PEM file as the intermediates the client presents), validity
now, the CRLs of `tls.crl` as `tls.crl_check` reads them (core.credentials.Trust,
built by the same shell.tls functions as the running gateway's), then the clientAuth
purpose and `tls.x509_strict`'s rules that OpenSSL's handshake adds. A refusal there
is the decision. Otherwise: the client the certificate maps to, and the verdict of
core.decide driven with the --form values, as the pipeline drives it.

`exit_code`: 0 allow, 1 deny, 3 allow only on a condition it cannot check offline (an
order operation's solicitor, looked up from the upstream at request time); unusable
input raises SettingsError, which the command makes exit 2.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.core.credentials import CredentialProblem, Trust
from gateway.core.decide import UNKNOWN, NeedFields, evaluate, run
from gateway.core.errors import SettingsError
from gateway.core.identity import identity_from_der
from gateway.core.operations import route
from gateway.core.strictjson import json_value
from gateway.core.x509_rules import broken_rules
from gateway.shell.settings import Config, load_config, load_policies
from gateway.shell.tls import check_crl, load_trust

TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")   # an HTTP method is a token (RFC 9110)


@dataclass(frozen=True)
class Explanation:
    lines: list[str]
    allowed: bool
    conditional: bool = False   # allowed only if what could not be checked offline holds

    @property
    def exit_code(self) -> int:
        if not self.allowed:
            return 1
        return 3 if self.conditional else 0


def explain(config_file: str | None, cert_pem: Path, method: str, path: str,
            form: list[tuple[str, str]], now: float | None = None) -> Explanation:
    """What the gateway would decide; SettingsError when the input cannot be used."""
    _check_request_line(method, path)
    config = load_config(config_file)
    policies = load_policies(config.policies)
    leaf, presented = _certificates(Path(cert_pem))
    trust = _trust(config)
    identity = identity_from_der(leaf.public_bytes(serialization.Encoding.DER))
    lines = [f"certificate: {identity.subject} (issuer {identity.issuer}, serial {identity.serial})",
             f"fingerprint_sha256: {identity.fingerprint_sha256}"]
    standing = trust.standing(leaf, presented)
    policy, why = policies.find(identity, standing.issuer)   # match.issuer: the CA whose signature holds
    lines.append(f"client: {policy.client} ({policy.file}, mode {policy.mode})" if policy else f"client: none ({why})")
    refused = credential_problem(config, trust, leaf, presented, time.time() if now is None else now)
    if refused is not None:
        return Explanation(lines + [f"decision: deny {refused.code}: {refused.reason} (refused in the TLS handshake)"],
                           False)
    if policy is None:
        return Explanation(lines + ["decision: deny 403"], False)
    rt = route(method.upper(), path)
    if rt is None:
        return Explanation(lines + [f"operation: none ({method.upper()} {path} is no operation)",
                                    "decision: deny 404"], False)
    lines.append(f"operation: {rt.operation.value}" + (f" (order {rt.order_id})" if rt.order_id else ""))
    fields: dict[str, list[str]] = {}
    for name, value in form:
        fields.setdefault(name, []).append(value)
    unknown = []

    def answer(need):
        if isinstance(need, NeedFields):
            return {k: v for k, v in fields.items() if need.names is None or k in need.names}
        given = fields.get("solicitor")  # NeedOrderSolicitor: --form solicitor=JSON stands for the order's
        if not given:
            lines.append("order scope: the order's solicitor is looked up from the upstream at request time; "
                         "give it with --form solicitor=JSON to check it here")
            unknown.append(need)
            return UNKNOWN
        value = json_value(given[0])
        return value if isinstance(value, dict) else None

    verdict = run(evaluate(policy, rt), answer)
    if verdict.would_deny:
        lines.append(f"decision: allow (report mode; would deny {verdict.would_deny_status}: "
                     f"{verdict.reason.removeprefix('would deny: ')})")
        return Explanation(lines, True)
    lines.append(f"decision: {'allow' if verdict.allow else f'deny {verdict.status}'}: {verdict.reason}")
    # report mode lets the call through whatever the order's solicitor: only enforce makes it a condition
    return Explanation(lines, verdict.allow, conditional=bool(unknown) and policy.mode == "enforce")


def credential_problem(config: Config, trust: Trust, leaf: x509.Certificate,
                       presented: tuple[x509.Certificate, ...], now: float) -> CredentialProblem | None:
    """Why the front door would refuse this certificate now, or None: the per-request check the
    pipeline makes (chain, validity, CRL), then what OpenSSL's handshake checks besides."""
    problem = trust.standing(leaf, presented).problem(now)
    if problem is not None:
        if problem.code == "unknown_ca":   # serving's wording is for a connection whose CA was taken away
            return CredentialProblem("unknown_ca", "the certificate does not chain to a CA of tls.client_ca")
        return problem
    purpose = _purpose_problem(leaf)
    if purpose is not None:
        return CredentialProblem("bad_purpose", purpose)
    if config.tls.x509_strict:
        try:
            broken = broken_rules(leaf)
        except ValueError:   # an extension cryptography cannot parse (an empty subjectAltName, say)
            broken = ["an extension that does not parse"]
        if broken:
            return CredentialProblem("nonconforming", f"tls.x509_strict refuses it: {'; '.join(broken)}")
    return None


def _purpose_problem(cert: x509.Certificate) -> str | None:
    """OpenSSL's "SSL client" purpose, which a server checks its clients' certificates against.
    Extensions cryptography cannot parse (an empty subjectAltName, which OpenSSL accepts) are not judged."""
    try:
        extensions = cert.extensions
    except ValueError:
        return None
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return "the certificate is not for client authentication (its extendedKeyUsage lacks clientAuth)"
    try:
        ku = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not (ku.digital_signature or ku.key_agreement):
        return "the certificate's keyUsage allows neither digitalSignature nor keyAgreement"
    return None


def _trust(config: Config) -> Trust:
    """The client CAs and CRLs, read as build_snapshot reads them for serving."""
    try:
        return load_trust(config, check_crl(config))
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise SettingsError(config.file, "tls", str(exc) or type(exc).__name__) from None


def _certificates(cert_pem: Path) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """The leaf, and the certificates after it in the file (the intermediates the client presents)."""
    try:
        data = cert_pem.read_bytes()
    except OSError as exc:
        raise SettingsError(cert_pem, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SettingsError(cert_pem, "", "is not a PEM certificate") from None
    return certs[0], tuple(certs[1:])


def _check_request_line(method: str, path: str) -> None:
    if not TOKEN.fullmatch(method):
        raise SettingsError("--method", "", f"{method!r} is not an HTTP method")
    if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
        raise SettingsError("--path", "", f"{path!r} is not a request path (/..., without spaces)")
