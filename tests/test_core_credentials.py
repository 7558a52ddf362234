"""The per-request credential check (gateway.core.credentials), without sockets: chains, clocks, CRLs."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from gateway.tools import pki
from gateway.core.credentials import CRLView, Trust

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
T = NOW.timestamp()


@pytest.fixture(scope="module")
def chain():
    root = pki.make_ca("root", not_before=NOW - 100 * DAY, not_after=NOW + 1000 * DAY)
    issuing = pki.make_ca("issuing", not_before=NOW - 10 * DAY, not_after=NOW + 20 * DAY, issuer=root, path_length=0)
    leaf, _ = pki.make_client_cert(*issuing, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    direct, _ = pki.make_client_cert(*root, "hr", not_before=NOW - DAY, not_after=NOW + 500 * DAY)
    impostor = pki.make_ca("issuing", not_before=NOW - 10 * DAY, not_after=NOW + 20 * DAY, issuer=root)
    outliving, _ = pki.make_client_cert(*issuing, "long", not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    return {"root": root[0], "issuing": issuing[0], "leaf": leaf, "direct": direct, "impostor": impostor[0],
            "outliving": outliving}


def crl(revoked=(), due: dict | None = None, issuers=("CN=root,O=gateway example", "CN=issuing,O=gateway example")):
    due = due if due is not None else {name: T + 5 * 86400 for name in issuers}
    return CRLView(frozenset(revoked), due)


def name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def test_the_chain_runs_out_with_its_earliest_certificate(chain):
    trust = Trust((chain["root"], chain["issuing"]))
    standing = trust.standing(chain["leaf"])
    assert standing.problem(T) is None
    assert standing.problem(T - 2 * 86400).code == "not_yet_valid"
    assert standing.problem(T + 11 * 86400).code == "expired"
    # issued by the root itself: its own +500 days, inside the root's +1000
    direct = trust.standing(chain["direct"])
    assert direct.problem(T + 499 * 86400) is None and direct.problem(T + 501 * 86400).code == "expired"


def test_an_issuing_ca_that_expires_first_ends_the_chain(chain):
    standing = Trust((chain["root"], chain["issuing"])).standing(chain["outliving"])  # leaf +30 days, CA +20
    assert standing.problem(T + 19 * 86400) is None
    assert standing.problem(T + 21 * 86400).code == "expired"


@pytest.mark.parametrize("mode, revoked, code", [
    ("leaf", [("CN=issuing,O=gateway example", "leaf")], "revoked"),
    ("leaf", [("CN=root,O=gateway example", "issuing")], None),         # leaf mode looks at the leaf only
    ("chain", [("CN=root,O=gateway example", "issuing")], "revoked"),
    ("chain", [], None),
])
def test_revocation_by_mode(chain, mode, revoked, code):
    entries = [(issuer, chain[which].serial_number) for issuer, which in revoked]
    trust = Trust((chain["root"], chain["issuing"]), crl(entries), mode)
    problem = trust.standing(chain["leaf"]).problem(T)
    assert (problem.code if problem else None) == code
    if code:
        assert trust.standing(chain["leaf"]).problem(T - 10 * 86400) is not None  # no clock can undo it


def test_a_missing_or_stale_crl(chain):
    only_root = crl(issuers=("CN=root,O=gateway example",))
    assert Trust((chain["root"], chain["issuing"]), only_root).standing(chain["leaf"]).problem(T).code == "crl_missing"
    trust = Trust((chain["root"], chain["issuing"]), crl(due={"CN=issuing,O=gateway example": T + 3600,
                                                              "CN=root,O=gateway example": None}), "chain")
    standing = trust.standing(chain["leaf"])
    assert standing.problem(T + 3599) is None
    assert standing.problem(T + 3601).code == "crl_expired"


def test_a_chain_the_bundle_cannot_complete(chain):
    only_root = Trust((chain["root"],))
    # the client presented its issuing CA in the handshake: the chain completes with it
    assert only_root.standing(chain["leaf"], (chain["issuing"],)).problem(T) is None
    # a resumed session shows no chain: it stands only under the trust that verified it
    assert only_root.standing(chain["leaf"], (), verified_under_this_trust=True).problem(T) is None
    assert only_root.standing(chain["leaf"], ()).problem(T).code == "unknown_ca"
    # a self-signed CA the client presents is no anchor; nor is a same-named CA with another key
    other_root = pki.make_ca("root", not_before=NOW - DAY, not_after=NOW + DAY)[0]
    assert Trust((other_root,)).standing(chain["leaf"], (chain["issuing"], chain["root"])).problem(T).code == "unknown_ca"
    assert Trust((chain["root"], chain["impostor"], chain["issuing"])).standing(chain["leaf"]).problem(T) is None
    assert Trust((chain["impostor"],)).standing(chain["leaf"]).problem(T).code == "unknown_ca"
