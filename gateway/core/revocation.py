"""Online revocation, the pure part: which fetched CRL to take, and a certificate's status from what is known.

The shell (shell/revocation.py) fetches CRLs from distribution points and asks
OCSP responders; this module decides, from bytes, certificates and a clock,
whether a fetched CRL may replace the one in force and what a request's
certificate chain stands at:

- a CRL is taken only if its issuer is a CA of tls.client_ca whose key verifies
  its signature, it is current (lastUpdate not ahead, nextUpdate not past), and
  its CRLNumber is not lower than the one in force;
- an OCSP answer (core/ocsp.py checks it) is reused while it is younger than
  ocsp_max_age_s and before its own nextUpdate;
- a certificate whose status cannot be had is "unavailable", and
  `on_unavailable` decides whether that refuses.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

GOOD, REVOKED, UNAVAILABLE = "good", "revoked", "unavailable"


@dataclass(frozen=True)
class FetchedCRL:
    """A CRL taken from a distribution point: what the per-request check needs of it."""

    issuer: str                     # RFC 4514
    issuer_key: str                 # the key id of the CA whose key verified it: CRLs are kept by CA, not name
    number: int | None              # CRLNumber
    this_update: float
    next_update: float | None
    revoked: frozenset[int]         # serial numbers
    der: bytes                      # kept in cache_dir, read back on start

    def current(self, now: float) -> bool:
        return self.this_update <= now + SKEW_S and (self.next_update is None or now <= self.next_update)


SKEW_S = 300.0   # clocks differ: a CRL or answer issued a little "in the future" is still taken


def accept_crl(data: bytes, cas: Iterable[x509.Certificate],
               in_force_of: Callable[[tuple[str, str]], FetchedCRL | None], now: float) -> tuple[FetchedCRL | None, str]:
    """The CRL in `data` (DER or PEM) if it may be taken, else None; and why, in words for the log.

    `in_force_of(crl_key)` is the CRL in force for that CA (by name and key id), if any."""
    try:
        crl = x509.load_der_x509_crl(data) if not data.lstrip().startswith(b"-----") else x509.load_pem_x509_crl(data)
        extensions = crl.extensions
    except ValueError:
        return None, "not a CRL (neither DER nor PEM), or one whose extensions do not parse"
    issuer = crl.issuer.rfc4514_string()
    signers = [ca for ca in cas if crl_issued_by(crl, ca)]
    if not [ca for ca in cas if ca.subject == crl.issuer]:
        return None, f"issued by {issuer}, which is no CA of tls.client_ca"
    if not signers:
        return None, f"its signature does not verify with the key of {issuer}"
    scope = _partial_scope(extensions)
    if scope:
        return None, f"{scope}: only a complete CRL is taken"
    this_update = crl.last_update_utc.timestamp()
    next_update = crl.next_update_utc.timestamp() if crl.next_update_utc is not None else None
    if this_update > now + SKEW_S:
        return None, "its lastUpdate is in the future"
    if next_update is not None and next_update < now:
        return None, "stale: past its nextUpdate"
    try:
        number = extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    key = (issuer, key_id(signers[0]))
    in_force = in_force_of(key)
    if in_force is not None and in_force.number is not None and (number is None or number < in_force.number):
        return None, f"its CRLNumber {number} is lower than the {in_force.number} in force"
    if in_force is not None and in_force.number is None and this_update < in_force.this_update:
        return None, "older than the CRL in force"
    fetched = FetchedCRL(issuer, key[1], number, this_update, next_update, frozenset(r.serial_number for r in crl),
                         crl.public_bytes(_DER))
    return fetched, "taken"


_KNOWN_CRL_EXTENSIONS = {x509.CRLNumber.oid, x509.AuthorityKeyIdentifier.oid, x509.IssuingDistributionPoint.oid,
                         x509.DeltaCRLIndicator.oid}


def _partial_scope(extensions: x509.Extensions) -> str | None:
    """Why a CRL covers less than every certificate of its CA (RFC 5280 6.3.3), or None: a delta CRL, an
    issuing distribution point that limits its scope, or a critical extension not understood here."""
    for ext in extensions:
        if ext.oid == x509.DeltaCRLIndicator.oid:
            return "a delta CRL"
        if ext.oid == x509.IssuingDistributionPoint.oid:
            idp = ext.value
            if (idp.only_contains_user_certs or idp.only_contains_ca_certs or idp.only_contains_attribute_certs
                    or idp.only_some_reasons or idp.indirect_crl):
                return "a CRL partitioned by its issuing distribution point"
        elif ext.critical and ext.oid not in _KNOWN_CRL_EXTENSIONS:
            return f"a critical extension not understood ({ext.oid.dotted_string})"
    return None


def crl_issued_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether `ca` issued the CRL: its name, and its key verifying the signature (any key type)."""
    if crl.issuer != ca.subject:
        return False
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError):
        return False


_DER = Encoding.DER


@dataclass(frozen=True)
class CachedAnswer:
    """An OCSP answer as kept: its status, when it was had, and until when its responder vouches for it."""

    status: str                     # good | revoked | unknown
    fetched_at: float
    next_update: float | None
    der: bytes = b""

    def usable(self, now: float, max_age_s: float, since: float | None = None) -> bool:
        """Whether to go by this answer now: younger than max_age_s when the request began (`since`;
        one it waited for is younger still), and never past its nextUpdate; a revocation does not lapse."""
        if self.status == REVOKED:   # a certificate revoked once stays revoked, whatever the answer's age
            return True
        if self.next_update is not None and now > self.next_update:
            return False
        return (now if since is None else since) - self.fetched_at < max_age_s


@dataclass(frozen=True)
class Status:
    """Where a chain stands: good, revoked (and which), or unavailable (and why)."""

    result: str
    reason: str = ""


CRL_WARN_DAYS = 14


def crl_warn_at(this_update: float, next_update: float) -> float:
    """When to warn that a CRL is due: a quarter of its validity before its nextUpdate, or 14 days before,
    whichever comes later (a CRL published weekly is not "expiring" all week)."""
    return next_update - min((next_update - this_update) / 4, CRL_WARN_DAYS * 86400)


def to_check(chain: tuple[x509.Certificate, ...], scope: str) -> list[tuple[x509.Certificate, x509.Certificate]]:
    """(certificate, its issuer) pairs to look up: the leaf only, or every certificate under the root."""
    pairs = list(zip(chain, chain[1:]))
    return pairs[:1] if scope == "leaf" else pairs


def chain_status(chain: tuple[x509.Certificate, ...], now: float, *, ocsp: str, max_age_s: float,
                 answers: Mapping[tuple[str, int], CachedAnswer], crl_fetch: bool, crl_check: str,
                 crls: Mapping[tuple[str, str], FetchedCRL], since: float | None = None) -> Status:
    """The chain's status from the answers and CRLs known now (no I/O: the shell fetched them).

    `since`: when the request began; answers are aged as of then, so that one current when the request
    began, or fetched while it waited, holds for the whole request. A serial a CRL lists stays revoked
    when that CRL goes stale; a chain known only in part (a resumed session) cannot be looked up."""
    missing: list[str] = []
    for scope, method in ((ocsp, "OCSP"), (crl_check if crl_fetch else "off", "CRL")):
        if scope == "off":
            continue
        if len(chain) < 2 or (scope == "chain" and chain[-1].subject != chain[-1].issuer):
            missing.append(f"the certificate chain is not known in full for {method}")
            continue
        for cert, issuer in to_check(chain, scope):
            what = _what(cert, chain)
            if method == "OCSP":
                answer = answers.get(answer_key(cert, issuer))
                if answer is None or not answer.usable(now, max_age_s, since):
                    missing.append(f"no current OCSP answer for the {what}")
                elif answer.status == REVOKED:
                    return Status(REVOKED, f"the OCSP responder says the {what} has been revoked")
                elif answer.status != GOOD:
                    missing.append(f"the OCSP responder does not know the {what}")
            else:
                crl = crls.get(crl_key(cert, issuer))
                if crl is not None and cert.serial_number in crl.revoked:
                    return Status(REVOKED, f"the {what} has been revoked (on the CRL fetched from its issuer)")
                if crl is None or not crl.current(now):
                    missing.append(f"no current CRL of {cert.issuer.rfc4514_string()}")
    if missing:
        return Status(UNAVAILABLE, "; ".join(missing))
    return Status(GOOD)


def crl_key(cert: x509.Certificate, issuer: x509.Certificate) -> tuple[str, str]:
    """The CRL that covers `cert`: its issuer's, by name and key (a CA renewed under the same name with a
    new key publishes CRLs of its own)."""
    return cert.issuer.rfc4514_string(), key_id(issuer)


def answer_key(cert: x509.Certificate, issuer: x509.Certificate) -> tuple[str, int]:
    """Answers are kept by the issuer's key and the serial: one certificate, whichever connection presents
    it (by key, not name: two CAs of one name must not share answers)."""
    return key_id(issuer), cert.serial_number


@functools.lru_cache(maxsize=256)
def key_id(issuer: x509.Certificate) -> str:
    return hashlib.sha256(issuer.public_key().public_bytes(_DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _what(cert: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> str:
    return "client certificate" if cert is chain[0] else f"CA certificate {cert.subject.rfc4514_string()}"
