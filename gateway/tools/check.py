"""`gateway check`: an answer without starting anything (`policy explain` is tools/explain.py).

Every problem of the config file, the policy files, the TLS files, the keys and
the storage settings, one line each, naming file and key.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509

from gateway.shell.audit_writer import load_key
from gateway.core.errors import SettingsError
from gateway.core.overlaps import find_possible_overlaps
from gateway.core.policy import Policy
from gateway.core.revocation import crl_issued_by, crl_warn_at
from gateway.shell.keys import readable_by_others
from gateway.shell.limits import storage_from_url
from gateway.shell.settings import Config, load_config, read_policies
from gateway.shell.tls import check_crl, crl_is_stale, example_keys_exposed, load_crls, server_context
from gateway.shell.token import TokenIssuer, configured_key
from gateway.shell.upstream_tls import upstream_context
from gateway.core.x509_rules import broken_rules

EXPIRY_WARNING_DAYS = 14


def check(config_file: str | None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a configuration and everything it names."""
    try:
        config = load_config(config_file)
    except SettingsError as exc:
        return [str(exc)], []
    where = str(config.file)
    policies: list[Policy] = []
    if config.policies.is_dir():
        policies, policy_problems = read_policies(config.policies)
        problems: list[str] = [str(p) for p in policy_problems]
    else:
        problems = [f"{where}: policies: {config.policies} is not a folder of policy files"]
    warnings: list[str] = []
    try:
        server_context(config)
        facts = check_crl(config)
        if crl_is_stale(facts, time.time()):
            problems.append(f"{where}: tls.crl: {config.tls.crl} is past its nextUpdate: every client would be refused")
    except SettingsError as exc:
        problems.append(str(exc))
    try:
        upstream_context(config)
    except SettingsError as exc:
        problems.append(str(exc))
    upstream_problems, upstream_warnings = _upstream_cert(config, time.time())
    problems += upstream_problems
    warnings += upstream_warnings
    for key, path in (("tls.key_password_file", config.tls.key_password_file),
                      ("identity_token.key_password_file",
                       config.identity_token.key_password_file if config.identity_token else None)):
        if readable_by_others(path):
            warnings.append(f"{where}: {key}: {path} can be read by others than its owner (chmod 600 it)")
    warnings += [f"{where}: listen.host: {why}" for why in example_keys_exposed(config)]
    trust_problems, trust_warnings = _trust(config, time.time())
    problems += trust_problems
    warnings += trust_warnings
    warnings += _issuer_pinning(config, policies)
    if config.identity_token is not None:
        key = config.identity_token.key
        if key is None:
            problems.append(f"{where}: identity_token.key: is required")
        elif key.exists():
            try:
                TokenIssuer(configured_key(config.identity_token, where), config.identity_token.audience,
                            config.identity_token.ttl_s)
            except SettingsError as exc:
                problems.append(str(exc))
            except (OSError, ValueError) as exc:
                problems.append(f"{where}: identity_token.key: {exc}")
        else:
            warnings.append(f"{where}: identity_token.key: {key} does not exist yet; it is created on first start")
    try:
        load_key(config.audit.key_file)
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: audit.key_file: {exc}")
    if config.audit.key_file is None:
        warnings.append(f"{where}: audit.key_file: not set: the audit chain then shows accidents, not tampering "
                        "(anyone who can write the log can recompute it); keep a key away from the log")
    elif config.audit.key_file.resolve().parent == config.audit.path.resolve().parent:
        warnings.append(f"{where}: audit.key_file: {config.audit.key_file} is in the audit log's own folder: "
                        "whoever can write the log can read the key and recompute the chain")
    if not config.audit.path.parent.exists():
        warnings.append(f"{where}: audit.path: {config.audit.path.parent} does not exist yet; it is created on start")
    try:
        storage_from_url(config.rate_limit.storage)
    except ValueError as exc:
        problems.append(f"{where}: rate_limit.storage: {exc}")
    ref = config.reference_api
    if config.upstream.url == "embedded" and ref.directory is not None:
        if not ref.directory.lower().startswith(("ldap://", "ldaps://")):
            if not Path(ref.directory).is_file():
                problems.append(f"{where}: reference_api.directory: {ref.directory} does not exist")
        else:  # the LDAP server itself is asked at each look-up (and by the reference API's /readyz)
            for key in ("password_file", "ca"):
                path = getattr(ref.ldap, key)
                if path is not None and not path.is_file():
                    problems.append(f"{where}: reference_api.ldap.{key}: {path} does not exist")
    return problems, warnings


def _read_certs(path: Path | None) -> list[x509.Certificate]:
    if path is None or not Path(path).is_file():
        return []
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError:
        return []  # server_context has said what is wrong with the file


def _read_crls(path: Path | None) -> list[x509.CertificateRevocationList]:
    if path is None or not Path(path).is_file():
        return []
    return load_crls(path, strict=False)  # what does not parse, check_crl has reported


def _upstream_cert(config: Config, now: float) -> tuple[list[str], list[str]]:
    """An expired upstream.cert is refused by the upstream: every call would be a 502."""
    problems, warnings = [], []
    # the leaf (a chain may follow it); what is wrong with the file, upstream_context has said
    for cert in _read_certs(config.upstream.cert)[:1]:
        name, end = cert.subject.rfc4514_string(), cert.not_valid_after_utc
        if end.timestamp() < now:
            problems.append(f"{config.file}: upstream.cert: {name} expired on {end:%Y-%m-%d}")
        elif end.timestamp() < now + EXPIRY_WARNING_DAYS * 86400:
            warnings.append(f"{config.file}: upstream.cert: {name} expires {end:%Y-%m-%d}")
    return problems, warnings


def _trust(config: Config, now: float) -> tuple[list[str], list[str]]:
    """What would lock clients out: expiry, CRLs that fit no CA, CAs without the CRL they need, strictness."""
    problems, warnings = [], []
    where, tls = config.file, config.tls
    soon = now + EXPIRY_WARNING_DAYS * 86400
    cas = _read_certs(tls.client_ca)
    for key, certs in (("cert", _read_certs(tls.cert)), ("client_ca", cas)):
        for cert in certs:
            name, end = cert.subject.rfc4514_string(), cert.not_valid_after_utc
            if end.timestamp() < now:
                problems.append(f"{where}: tls.{key}: {name} expired on {end:%Y-%m-%d}")
            elif end.timestamp() < soon:
                warnings.append(f"{where}: tls.{key}: {name} expires {end:%Y-%m-%d}")
    if tls.crl is None:
        crls = []
    else:
        crls = _read_crls(tls.crl)
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        due = crl.next_update_utc
        if not any(crl_issued_by(crl, ca) for ca in cas):
            problems.append(f"{where}: tls.crl: the CRL of {issuer} was issued by no CA in tls.client_ca "
                            "(a leftover?): it vouches for no client")
        elif due is not None and now <= due.timestamp() and \
                now >= crl_warn_at(crl.last_update_utc.timestamp(), due.timestamp()):
            warnings.append(f"{where}: tls.crl: the CRL of {issuer} is due for renewal by {due:%Y-%m-%d %H:%M} UTC; "
                            "past it every client of that CA is refused")
    if tls.crl is not None and crls:
        issuers_of_cas = {ca.issuer for ca in cas if ca.issuer != ca.subject}
        for ca in cas:
            if any(crl_issued_by(crl, ca) for crl in crls):
                continue
            name = ca.subject.rfc4514_string()
            if tls.crl_check == "chain":
                continue  # check_crl has named it already
            if ca.subject in issuers_of_cas:
                warnings.append(f"{where}: tls.crl: no CRL of {name}: clients it issues directly would be refused "
                                "(crl_check: leaf needs the CRL of each client's issuer)")
            else:
                problems.append(f"{where}: tls.crl: no CRL of {name}: every client it issued would be refused "
                                "(crl_check: leaf needs the CRL of each client's issuer)")
    for ca in cas:
        broken = broken_rules(ca, trust_anchor=ca.subject == ca.issuer)
        if not broken:
            continue
        line = f"{where}: tls.client_ca: {ca.subject.rfc4514_string()} breaks RFC 5280: {'; '.join(broken)}"
        if tls.x509_strict:
            problems.append(line + " (tls.x509_strict refuses its clients)")
        else:
            warnings.append(line + " (accepted; tls.x509_strict: true would refuse its clients)")
    return problems, warnings


def _issuer_pinning(config: Config, policies: list[Policy]) -> list[str]:
    """Policies a certificate of more than one CA could match: with several CAs in tls.client_ca (distinct
    subjects, roots and intermediates alike: OpenSSL accepts a client any of them issued), a policy without
    `issuer` is the client of whichever CA issues a certificate with its values. And an issuer that is no
    CA of the bundle matches nothing (the pin holds only for a CA of the bundle whose signature is verified)."""
    cas = {ca.subject.rfc4514_string() for ca in _read_certs(config.tls.client_ca)}
    warnings = []
    for policy in policies:
        issuers = dict(policy.match).get("issuer")
        if issuers is None and len(cas) > 1:
            warnings.append(f"{policy.file}: match: no issuer, and tls.client_ca holds {len(cas)} CAs: a certificate "
                            f"any of them issues with these values is client {policy.client} (pin it with "
                            f"match.issuer: one of {'; '.join(sorted(cas))})")
        for issuer in [i for i in issuers or () if cas and i not in cas]:
            warnings.append(f"{policy.file}: match.issuer: {issuer} is no CA of tls.client_ca: the pin holds "
                            "only for a CA of the bundle, so this policy matches no certificate")
    for a, b in find_possible_overlaps(policies):
        warnings.append(f"{b.file}: match: a certificate carrying both this policy's values (client {b.client}) "
                        f"and those of {a.file} (client {a.client}) would match both, and be refused as "
                        "unknown_client: tell them apart by issuer or by a key both use")
    return warnings
