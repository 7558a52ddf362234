"""Whether a connection's client certificate still holds: checked on every request.

OpenSSL verifies the client's chain when a TLS session is made. A connection
that stays open, or a session resumed from a ticket, is not looked at again,
so a certificate that expired, was revoked by a reloaded CRL, or relies on a
CRL past its nextUpdate would go on being served. The pipeline therefore asks
here, for every request, whether the chain holds under the trust in force now.

The work is split by how often it changes: `Trust.standing` builds the chain
from the leaf through the CAs of `tls.client_ca` once per connection and trust
generation (signatures checked, revocation looked up); `Standing.problem(now)`
is the per-request part, three comparisons against the clock.

Pure: certificates in, verdicts out; no files, sockets or clocks of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature

MAX_DEPTH = 10


class CredentialProblem(NamedTuple):
    code: str      # fixed reason code (metrics label)
    reason: str    # for the client's problem detail and the audit line


@dataclass(frozen=True)
class CRLView:
    """What the configured CRL file says, by issuer."""

    revoked: frozenset[tuple[str, int]]           # (issuer RFC 4514, serial)
    next_update: Mapping[str, float | None]       # issuer -> earliest nextUpdate of its CRLs (None: not stated)


@dataclass(frozen=True)
class Standing:
    """A chain's standing under one trust generation; `problem(now)` is the per-request check."""

    not_before: float = -math.inf     # the latest notBefore of the chain's certificates
    not_after: float = math.inf       # the earliest notAfter
    crl_due: float = math.inf         # the earliest nextUpdate of the CRLs the chain relies on
    fixed: CredentialProblem | None = None   # revoked, no CRL, or no longer trusted: no clock needed
    issuer: str | None = None         # DN of the CA of tls.client_ca that signed the leaf (RFC 4514); None when
                                      # its issuer is an intermediate the client presented: what match.issuer pins
    chain: tuple[x509.Certificate, ...] = ()   # leaf first, up to the root: what online revocation looks up

    def problem(self, now: float) -> CredentialProblem | None:
        if self.fixed is not None:
            return self.fixed
        if now < self.not_before:
            return CredentialProblem("not_yet_valid", "the client certificate is not valid yet")
        if now > self.not_after:
            return CredentialProblem("expired", "the client certificate (or a CA of its chain) has expired")
        if now > self.crl_due:
            return CredentialProblem("crl_expired",
                                     "the CRL is past its nextUpdate: no client is served until a fresh one is loaded")
        return None


@dataclass(frozen=True, eq=False)
class Trust:
    """The client CAs and CRLs in force; replaced whole on reload (identity marks the generation)."""

    cas: tuple[x509.Certificate, ...]
    crl: CRLView | None = None
    crl_check: str = "leaf"       # or "chain"
    _by_subject: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for ca in self.cas:
            self._by_subject.setdefault(ca.subject, []).append(ca)

    def standing(self, leaf: x509.Certificate, presented: tuple[x509.Certificate, ...] = (),
                 verified_under_this_trust: bool = False) -> Standing:
        """The standing of `leaf`'s chain under this trust, checked against the CRLs.

        The chain is built as OpenSSL builds it: issuers from tls.client_ca first, then the
        intermediates the client presented (`presented`: what it sent, never the CAs
        OpenSSL added from an older trust store), ending at a self-signed CA that tls.client_ca holds now. A resumed TLS
        session shows no chain; if the leaf's issuer is not in the bundle, the chain is
        known only in part: it stands under the trust that verified it (a resumed session
        can only come from a handshake under the same context), not after a reload.
        """
        chain, complete = self._chain(leaf, presented)
        if not complete and not verified_under_this_trust:
            return Standing(fixed=CredentialProblem(
                "unknown_ca", "the client certificate no longer chains to a CA of tls.client_ca"))
        not_before = max(c.not_valid_before_utc.timestamp() for c in chain)
        not_after = min(c.not_valid_after_utc.timestamp() for c in chain)
        signer = chain[1] if len(chain) > 1 else None
        issuer = signer.subject.rfc4514_string() if signer is not None and any(signer is ca for ca in self.cas) else None
        if self.crl is None:
            return Standing(not_before, not_after, issuer=issuer, chain=tuple(chain))
        checked = chain if self.crl_check == "chain" else chain[:1]
        due = math.inf
        for cert in checked:
            issuer = cert.issuer.rfc4514_string()
            if issuer not in self.crl.next_update:
                return Standing(fixed=CredentialProblem("crl_missing", f"no CRL of {issuer} is loaded"))
            if (issuer, cert.serial_number) in self.crl.revoked:
                what = "client certificate" if cert is leaf else f"CA certificate {cert.subject.rfc4514_string()}"
                return Standing(fixed=CredentialProblem("revoked", f"the {what} has been revoked"))
            next_update = self.crl.next_update[issuer]
            if next_update is not None:
                due = min(due, next_update)
        return Standing(not_before, not_after, due, issuer=issuer, chain=tuple(chain))

    def _chain(self, leaf: x509.Certificate,
               presented: tuple[x509.Certificate, ...]) -> tuple[list[x509.Certificate], bool]:
        """leaf, then each issuer found; complete when it ends at a self-signed CA of the bundle."""
        chain = [leaf]
        cert = leaf
        for _ in range(MAX_DEPTH):
            issuer = self._issuer_of(cert, presented)
            if issuer is None or any(issuer is c for c in chain):
                return chain, False
            chain.append(issuer)
            if issuer.subject == issuer.issuer:
                return chain, any(issuer == ca for ca in self._by_subject.get(issuer.subject, ()))
            cert = issuer
        return chain, False

    def _issuer_of(self, cert: x509.Certificate,
                   presented: tuple[x509.Certificate, ...]) -> x509.Certificate | None:
        trusted = self._by_subject.get(cert.issuer, [])
        for ca in [*trusted, *(p for p in presented if p.subject == cert.issuer)]:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None
