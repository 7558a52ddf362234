"""Two policies one certificate could match: an error when they share a value, a warning otherwise.

Which client a certificate is must never depend on which policy file was read
first. The check is pairwise, on the parsed policies, when the folder is
loaded (`gateway check`, start, every reload); docs/policies.md has the rule
and a table of examples.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.core.policy import Policy

# The keys a certificate has exactly one value of (common_name: at most one); the SAN keys are lists,
# so two different SAN values can both be in one certificate.
SINGLE_VALUED = ("subject", "issuer", "common_name", "fingerprint_sha256")


def overlaps(a: Policy, b: Policy) -> bool:
    """Whether the two policies name the same certificates: a settings error.

    They overlap when they share a match key with a value in common (a subject also
    counts as its one CN, so `subject: "CN=a,O=x"` and `common_name: a` share one), and
    no field a certificate has one value of (subject, issuer, common_name,
    fingerprint_sha256) tells them apart: both constrain it, with no value in common.
    Two `issuer` pins to different CAs are what lets two policies name the same subject.
    """
    one, other = _possible(a), _possible(b)
    return _linked(a, b, one, other) and _meet(one, other)


def may_overlap(a: Policy, b: Policy) -> bool:
    """Whether one certificate could still match both though they share no value (a warning).

    Policies matching on different keys (a fingerprint and a subject, a common name and a
    SAN) are not told apart by anything: a certificate carrying both would be refused as
    matching two clients. Policies using the same keys with different values (two SPIFFE
    IDs, say) are the ordinary case and are not reported.
    """
    one, other = _possible(a), _possible(b)
    if _linked(a, b, one, other) or not _meet(one, other):
        return False
    keys = lambda p: {k for k, _ in p.match} - {"issuer"}  # noqa: E731
    return keys(a) != keys(b)


def find_overlaps(policies: list[Policy]) -> list[tuple[Policy, Policy]]:
    """Every pair of policies that overlap (`overlaps`), in the order given."""
    return [(a, b) for i, a in enumerate(policies) for b in policies[i + 1:] if overlaps(a, b)]


def find_possible_overlaps(policies: list[Policy]) -> list[tuple[Policy, Policy]]:
    """Every pair `may_overlap` reports, in the order given."""
    return [(a, b) for i, a in enumerate(policies) for b in policies[i + 1:] if may_overlap(a, b)]


def _linked(a: Policy, b: Policy, one: dict, other: dict) -> bool:
    """A match key both give with a value in common (the common name implied by a subject included)."""
    given = dict(b.match)
    if any(key != "issuer" and key in given and set(values) & set(given[key]) for key, values in a.match):
        return True
    return one["common_name"] is not None and other["common_name"] is not None \
        and bool(one["common_name"] & other["common_name"])


def _meet(one: dict, other: dict) -> bool:
    return all(one[k] is None or other[k] is None or bool(one[k] & other[k]) for k in SINGLE_VALUED)


_UNKNOWN_CN = object()


def _possible(policy: Policy) -> dict[str, frozenset | None]:
    """The values each single-valued field can have in a certificate the policy matches (None: any)."""
    given = dict(policy.match)
    out: dict[str, frozenset | None] = {k: frozenset(given[k]) if k in given else None for k in SINGLE_VALUED}
    if "subject" in given:
        implied = {_common_name_of(s) for s in given["subject"]}
        if _UNKNOWN_CN not in implied:
            cns = out["common_name"]
            out["common_name"] = frozenset(implied) if cns is None else cns & implied
    return out


def _common_name_of(subject: str) -> object:
    """The common_name of a certificate whose subject renders as `subject` (None: it has none, or
    several); _UNKNOWN_CN when the text is not a DN as identity.py renders one (then it implies nothing)."""
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except (ValueError, TypeError):
        return _UNKNOWN_CN
    if name.rfc4514_string() != subject:   # only a text the certificate's own rendering gives back is sure
        return _UNKNOWN_CN
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if len(cns) == 1 else None
