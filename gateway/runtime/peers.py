"""Who is on a connection, checked on every request: the client certificate and whether it still holds.

A certificate (leaf and presented chain, byte for byte) is parsed once, and its
standing (core.credentials: the chain rebuilt, its signatures checked) built once a
trust generation (a reload makes a new one), whichever connection presents it: most
clients present the same certificate on every connection, and a client that opens one
connection a call would otherwise pay for both each time. Each request then costs a
dictionary look-up and three comparisons.
"""

from __future__ import annotations

import ssl
import weakref
from collections import OrderedDict
from typing import Any

from cryptography import x509

from gateway.core.credentials import Standing, Trust
from gateway.core.errors import Reason, Refusal
from gateway.core.exchange import Exchange
from gateway.core.identity import identity_from_der
from gateway.core.policy import Policy
from gateway.runtime.snapshot import Gateway
from gateway.shell.compat import presented_chain


class Credential:
    """A presented certificate and chain: parsed once, shared by every connection that presents them."""

    __slots__ = ("identity", "cert", "presented", "_trust", "_standings")

    def __init__(self, der: bytes, chain: list[bytes]):
        self.identity = identity_from_der(der)
        self.cert = x509.load_der_x509_certificate(der)
        self.presented = tuple(_parsed(chain[1:]))
        self._trust: Trust | None = None
        self._standings: dict[bool, Standing] = {}   # by whether the handshake was under this trust

    def standing(self, trust: Trust, verified_under_this_trust: bool) -> Standing:
        if self._trust is not trust:
            self._trust, self._standings = trust, {}
        standing = self._standings.get(verified_under_this_trust)
        if standing is None:
            standing = self._standings[verified_under_this_trust] = trust.standing(
                self.cert, self.presented, verified_under_this_trust)
        return standing


CREDENTIALS_KEPT = 1024
_credentials: "OrderedDict[tuple[bytes, tuple[bytes, ...]], Credential]" = OrderedDict()


def credential_of(der: bytes, chain: list[bytes]) -> Credential:
    """The Credential of these exact bytes, from the most recently used CREDENTIALS_KEPT."""
    key = (der, tuple(chain))
    credential = _credentials.get(key)
    if credential is None:
        credential = _credentials[key] = Credential(der, chain)
        if len(_credentials) > CREDENTIALS_KEPT:
            _credentials.popitem(last=False)
    else:
        _credentials.move_to_end(key)
    return credential


class Peer:
    """A connection's client certificate and the TLS context of its handshake."""

    __slots__ = ("credential", "identity", "cert", "handshake_context", "reported", "__weakref__")

    def __init__(self, credential: Credential, handshake_context: ssl.SSLContext | None):
        self.credential, self.identity, self.cert = credential, credential.identity, credential.cert
        self.handshake_context = handshake_context
        self.reported = None   # the policy whose client certificate metric this connection has set

    def standing(self, gw: Gateway) -> Standing | None:
        if gw.trust is None:
            return None
        return self.credential.standing(gw.trust, self.handshake_context is gw.tls_context)


def _parsed(chain: list[bytes]):
    """The certificates after the leaf that parse: OpenSSL may accept one cryptography will not read,
    and a chain that needs it is then found incomplete (403), never a 500."""
    for der in chain:
        try:
            yield x509.load_der_x509_certificate(der)
        except ValueError:
            continue


_peers: "weakref.WeakKeyDictionary[Any, Peer]" = weakref.WeakKeyDictionary()


def peer_of(transport) -> Peer | None:
    """The connection's verified client certificate (None when there is none), parsed once a connection."""
    if transport is None:
        return None
    peer = _peers.get(transport)
    if peer is None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        peer = _peers[transport] = Peer(credential_of(der, presented_chain(ssl_object)),
                                       transport.get_extra_info("sslcontext"))
    return peer


def admit_peer(gw: Gateway, transport, ex: Exchange) -> Policy:
    """Identity first, on every request: a certificate that still holds and maps to one policy, else 403.

    A certificate that no longer holds (expired, revoked, its CRL stale, its CA no
    longer trusted) also closes the connection, so a resumed session cannot linger.
    """
    peer = peer_of(transport)
    if peer is None:
        raise Refusal(403, Reason.NO_CERTIFICATE, "no verified client certificate", close=True)
    ex.identity = peer.identity
    standing = peer.standing(gw)
    # match.issuer holds only for the CA of tls.client_ca whose signature was verified, never for a name
    policy, why = gw.policies.find(peer.identity, standing.issuer if standing is not None else None)
    if policy is not None:
        ex.client = policy.client  # named in the audit line and metrics even when refused below
        if peer.reported is not policy:   # once a connection and policy: the client's certificate lifetime
            peer.reported = policy
            gw.metrics.client_certificate_seen(policy.client, peer.identity.fingerprint_sha256,
                                               peer.cert.not_valid_after_utc.timestamp(), gw.clock())
    problem = standing.problem(gw.clock()) if standing is not None else None
    if problem is not None:
        raise Refusal(403, Reason(problem.code), problem.reason, close=True)
    if gw.revocation is not None and standing is not None:
        _check_revocation(gw, standing, ex)
    if policy is None:
        raise Refusal(403, Reason.UNKNOWN_CLIENT, why)
    return policy


def _check_revocation(gw: Gateway, standing: Standing, ex: Exchange) -> None:
    """tls.revocation: the OCSP answers and fetched CRLs known now (Pipeline fetched what was missing)."""
    status = gw.revocation.status(standing.chain, ex.revocation_since)
    if status.result == "revoked":
        raise Refusal(403, Reason.REVOKED, status.reason, close=True)
    if status.result == "unavailable":
        if gw.config.tls.revocation.on_unavailable == "deny":
            raise Refusal(403, Reason.REVOCATION_UNAVAILABLE,
                          f"the client certificate's revocation status cannot be learnt now: {status.reason}",
                          close=True)
        ex.revocation = f"unavailable, let through (on_unavailable: allow): {status.reason}"
