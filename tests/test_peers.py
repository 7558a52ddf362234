"""Certificates parsed once, whichever connection presents them (gateway.runtime.peers), without sockets."""

from __future__ import annotations

import datetime as dt

from cryptography.hazmat.primitives.serialization import Encoding

from gateway.core.credentials import CRLView, Trust
from gateway.runtime import peers
from gateway.tools import pki

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


def der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


def test_one_credential_for_the_same_bytes_and_a_new_one_for_any_other_chain(monkeypatch):
    monkeypatch.setattr(peers, "_credentials", type(peers._credentials)())
    root, root_key = pki.make_ca("root", not_before=NOW - DAY, not_after=NOW + 100 * DAY)
    issuing = pki.make_ca("issuing", not_before=NOW - DAY, not_after=NOW + 50 * DAY, issuer=(root, root_key),
                          path_length=0)
    leaf, _ = pki.make_client_cert(*issuing, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    other, _ = pki.make_client_cert(*issuing, "hr", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    bare = peers.credential_of(der(leaf), [der(leaf)])
    assert peers.credential_of(der(leaf), [der(leaf)]) is bare
    with_issuing = peers.credential_of(der(leaf), [der(leaf), der(issuing[0])])
    assert with_issuing is not bare and with_issuing.presented == (issuing[0],)
    assert peers.credential_of(der(other), [der(other)]).identity.common_name == "hr"
    assert bare.identity.common_name == "crm"

    # the standing is built once a trust generation, and again under a new one
    only_root = Trust((root,))
    assert bare.standing(only_root, False).problem(NOW.timestamp()).code == "unknown_ca"
    assert with_issuing.standing(only_root, False).problem(NOW.timestamp()) is None
    assert with_issuing.standing(only_root, False) is with_issuing.standing(only_root, False)
    revoked = Trust((root, issuing[0]), CRLView(frozenset({(issuing[0].subject.rfc4514_string(), leaf.serial_number)}),
                                                 {issuing[0].subject.rfc4514_string(): None}))
    assert with_issuing.standing(revoked, False).problem(NOW.timestamp()).code == "revoked"
    # a resumed session (no chain shown) under the context that verified it, and after a reload
    assert bare.standing(only_root, True).problem(NOW.timestamp()) is None
    assert bare.standing(only_root, False).problem(NOW.timestamp()).code == "unknown_ca"


def test_only_the_most_recently_used_are_kept(monkeypatch):
    monkeypatch.setattr(peers, "_credentials", type(peers._credentials)())
    monkeypatch.setattr(peers, "CREDENTIALS_KEPT", 2)
    ca = pki.make_ca("root", not_before=NOW - DAY, not_after=NOW + 100 * DAY)
    a, b, c = (der(pki.make_client_cert(*ca, n, not_before=NOW - DAY, not_after=NOW + DAY)[0]) for n in "abc")
    first = peers.credential_of(a, [a])
    peers.credential_of(b, [b])
    assert peers.credential_of(a, [a]) is first   # used again: now the most recent
    peers.credential_of(c, [c])                   # b goes
    assert list(peers._credentials) == [(a, (a,)), (c, (c,))]
