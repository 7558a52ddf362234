"""gateway.core.policy: policy files, identity matching and the decide_* functions."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.core.identity import Identity
from gateway.core.operations import Operation
from gateway.core.errors import SettingsError
from gateway.core.overlaps import find_overlaps, may_overlap, overlaps
from gateway.core.policy import (PolicySet, Rate, decide_anonymize, decide_operation, decide_order_scope,
                                 decide_solicitor, parse_policy)
from gateway.shell.settings import check_policies, load_policies

ROOT = Path(__file__).resolve().parent.parent
FP = "ab" * 32
FP_CANON = ":".join(["AB"] * 32)
BASE = {"client": "svc", "match": {"subject": "CN=svc,O=x"}, "allow": ["read_order"],
        "solicitors": [{"source": "INTERNAL", "identifier": "sAMAccountName=*"}]}
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def ident(subject="CN=svc,O=x", cn="svc", dns=(), uri=(), email=(), fp=FP_CANON, issuer="CN=ca") -> Identity:
    return Identity(subject, cn, tuple(dns), tuple(uri), tuple(email), fp, "1f", issuer, NOW, NOW)


def policy(**changes):
    data = {**BASE, **changes}
    return parse_policy({k: v for k, v in data.items() if v is not None}, "p.yaml")


@pytest.mark.parametrize("changes, key", [
    ({"colour": "blue"}, "colour"),
    ({"client": "has space"}, "client"), ({"client": ""}, "client"), ({"client": "-x"}, "client"),
    ({"client": "a" * 65}, "client"), ({"client": 42}, "client"), ({"client": None}, "client"),
    ({"match": None}, "match"), ({"match": {}}, "match"), ({"match": "CN=svc"}, "match"),
    ({"match": {"serial": "1f"}}, "match.serial"), ({"match": {"subject": ""}}, "match.subject"),
    ({"match": {"san_dns": []}}, "match.san_dns"), ({"match": {"san_uri": ["a", 5]}}, "match.san_uri"),
    ({"match": {"fingerprint_sha256": "AB:CD"}}, "match.fingerprint_sha256"),
    ({"match": {"fingerprint_sha256": "zz" * 32}}, "match.fingerprint_sha256"),
    ({"match": {"fingerprint_sha256": "ab" * 33}}, "match.fingerprint_sha256"),
    ({"allow": "read_order"}, "allow"), ({"allow": ["read_order", "Read_Order"]}, "allow[1]"),
    ({"allow": ["delete_everything"]}, "allow[0]"),
    ({"solicitors": ["INTERNAL:x"]}, "solicitors[0]"),
    ({"solicitors": [{"source": "INTERNAL"}]}, "solicitors[0]"),
    ({"solicitors": [{"source": "INTERNAL", "identifier": "x", "extra": 1}]}, "solicitors[0]"),
    ({"solicitors": [{"source": "internal", "identifier": "x"}]}, "solicitors[0].source"),
    ({"solicitors": [{"source": "INTERNAL", "identifier": ""}]}, "solicitors[0].identifier"),
    ({"solicitors": [{"source": "EXTERNAL", "identifier": 7}]}, "solicitors[0].identifier"),
    ({"solicitors": []}, "solicitors"), ({"solicitors": None}, "solicitors"),
    ({"allow": ["create_order"], "solicitors": None}, "solicitors"),
    ({"allow": ["anonymize_user"], "solicitors": None}, "anonymize"),
    ({"allow": ["anonymize_user"], "anonymize": []}, "anonymize"),
    ({"anonymize": "*"}, "anonymize"), ({"anonymize": ["*", ""]}, "anonymize"),
    ({"rate_limit": 5}, "rate_limit"), ({"rate_limit": {"burst": 5}}, "rate_limit"),
    ({"rate_limit": {"per_second": 1, "per_minute": 5}}, "rate_limit"),
    ({"rate_limit": {"per_second": 0}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": -1}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": "10"}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": True}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": 1, "burst": 0}}, "rate_limit.burst"),
    ({"rate_limit": {"per_second": 1, "burst": 1.5}}, "rate_limit.burst"),
    ({"rate_limit": {"per_second": 1, "per_day": 3}}, "rate_limit.per_day"),
    ({"rate_limit": {"operations": [1]}}, "rate_limit.operations"),
    ({"rate_limit": {"operations": {"nope": {"per_second": 1}}}}, "rate_limit.operations.nope"),
    ({"rate_limit": {"operations": {"read_order": 5}}}, "rate_limit.operations.read_order"),
    ({"rate_limit": {"operations": {"read_order": {"per_hour": 0}}}}, "rate_limit.operations.read_order.per_hour"),
    ({"max_upload_bytes": 0}, "max_upload_bytes"), ({"max_upload_bytes": -1}, "max_upload_bytes"),
    ({"max_upload_bytes": "10"}, "max_upload_bytes"), ({"max_upload_bytes": True}, "max_upload_bytes"),
    ({"max_upload_bytes": 1.5}, "max_upload_bytes"),
    ({"mode": "audit"}, "mode"), ({"mode": "ENFORCE"}, "mode"), ({"mode": None}, "mode"),
])
def test_problems_name_file_and_key(tmp_path, changes, key):
    data = {**BASE, **changes}
    f = tmp_path / "broken-client.yaml"
    f.write_text(yaml.safe_dump(data), encoding="utf-8")
    problems = check_policies(tmp_path)
    assert len(problems) == 1 and isinstance(problems[0], SettingsError)
    assert "broken-client.yaml" in str(problems[0])
    assert f"{key}:" in str(problems[0]) and problems[0].key == key
    with pytest.raises(SettingsError) as info:
        load_policies(tmp_path)
    assert str(info.value) == str(problems[0])


@pytest.mark.parametrize("value", [5, True])
def test_scalar_solicitors_is_a_policy_error(value):
    with pytest.raises(SettingsError, match="solicitors"):
        policy(solicitors=value)


@pytest.mark.parametrize("rate", [{"per_second": float("nan")}, {"per_second": float("nan"), "burst": 2},
                                  {"per_minute": float("inf"), "burst": 2}])
def test_non_finite_rate_is_a_policy_error(rate):
    with pytest.raises(SettingsError, match="rate_limit"):
        policy(rate_limit=rate)


def test_file_level_problems(tmp_path):
    (tmp_path / "a.yaml").write_text("client: [unclosed\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("", encoding="utf-8")
    (tmp_path / "c.yaml").write_text("- a list\n", encoding="utf-8")
    problems = check_policies(tmp_path)
    assert [Path(p.file).name for p in problems] == ["a.yaml", "b.yaml", "c.yaml"]
    assert "a.yaml" in str(problems[0]) and "not valid YAML at line" in str(problems[0])
    assert "must be a mapping" in str(problems[1])
    assert check_policies(tmp_path / "missing")[0].message == "is not a folder of policy files"


def test_duplicate_client_across_files(tmp_path):
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(BASE), encoding="utf-8")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**BASE, "match": {"common_name": "z"}}), encoding="utf-8")
    problems = check_policies(tmp_path)
    assert len(problems) == 1
    assert "two.yaml" in str(problems[0]) and "client:" in str(problems[0]) and "one.yaml" in str(problems[0])
    with pytest.raises(SettingsError, match="two.yaml: client:"):
        load_policies(tmp_path)


def test_committed_policies_load():
    assert check_policies(ROOT / "policies") == []
    ps = load_policies(ROOT / "policies")
    by = {p.client: p for p in ps.policies}
    assert set(by) == {"hr-system", "crm"}
    assert by["hr-system"].allow == frozenset(Operation) and by["hr-system"].anonymize == ("*",)
    assert Operation.DELETE_ORDER not in by["crm"].allow and Operation.ANONYMIZE_USER not in by["crm"].allow
    assert by["crm"].rate_limit.client == Rate(10.0, 20)
    assert by["crm"].rate_limit.operations[Operation.CREATE_ORDER] == Rate(1.0, 10)
    assert by["hr-system"].max_upload_bytes == 33554432 and by["crm"].mode == "enforce"
    found, why = ps.find(ident(subject="CN=crm,O=gateway example", cn="crm"))
    assert found is by["crm"] and why == "client crm"


def test_rate_defaults_and_periods():
    p = policy(rate_limit={"per_hour": 7200, "operations": {"read_order": {"per_minute": 30}}})
    assert p.rate_limit.client == Rate(2.0, 7200)
    assert p.rate_limit.operations == {Operation.READ_ORDER: Rate(0.5, 30)}
    assert policy().rate_limit.client is None and policy(mode="report").mode == "report"


def test_matching_semantics():
    p = policy(match={"subject": "CN=svc,O=x", "san_uri": ["spiffe://a/svc", "spiffe://b/svc"]})
    assert p.matches(ident(uri=["spiffe://b/svc"]))
    assert p.matches(ident(uri=["other", "spiffe://a/svc"]))
    assert not p.matches(ident(uri=["spiffe://c/svc"]))          # every key must match
    assert not p.matches(ident(subject="CN=svc,O=y", uri=["spiffe://a/svc"]))
    assert not p.matches(ident(subject="cn=svc,O=x", uri=["spiffe://a/svc"]))  # subject is exact
    cn = policy(match={"common_name": ["a", "svc"]})
    assert cn.matches(ident()) and not cn.matches(ident(cn=None)) and not cn.matches(ident(cn="SVC"))
    for key, field in (("san_dns", "dns"), ("san_email", "email")):
        q = policy(match={key: "x@y"})
        assert q.matches(ident(**{field: ["x@y"]})) and not q.matches(ident(**{field: ["X@y"]}))


@pytest.mark.parametrize("given", [FP, FP.upper(), FP_CANON, FP_CANON.lower(), f" {FP} "])
def test_fingerprint_is_normalised(given):
    p = policy(match={"fingerprint_sha256": given})
    assert p.match == (("fingerprint_sha256", (FP_CANON,)),)
    assert p.matches(ident()) and not p.matches(ident(fp=FP_CANON.replace("AB", "AC", 1)))


def test_policy_set_find():
    a = policy(client="a", match={"common_name": "svc"})
    b = policy(client="b", match={"subject": "CN=svc,O=x"})
    c = policy(client="c", match={"common_name": "other"})
    assert PolicySet([c]).find(ident()) == (None, "the certificate matches no client policy")
    assert PolicySet([a, c]).find(ident()) == (a, "client a")
    found, why = PolicySet([b, c, a]).find(ident())
    assert found is None and "more than one" in why and "(a, b)" in why


def test_decide_operation():
    p = policy(allow=["read_order", "order_state"])
    assert decide_operation(p, Operation.READ_ORDER).allow
    d = decide_operation(p, Operation.DELETE_ORDER)
    assert (d.allow, d.status) == (False, 403) and "delete_order" in d.reason and "svc" in d.reason


SOL = {"source": "INTERNAL", "identifier": "sAMAccountName=anna"}


@pytest.mark.parametrize("values, status", [
    ([], 400), ([SOL, SOL], 400), ([ValueError("bad")], 400), (["text"], 400), ([[SOL]], 400), ([None], 400),
    ([{"source": "INTERNAL", "identifier": 5}], 403), ([{"source": "INTERNAL"}], 403), ([{}], 403),
    ([{"source": "INTERNAL", "identifier": "samaccountname=anna"}], 403),
    ([{"source": "internal", "identifier": "sAMAccountName=anna"}], 403),
    ([{"source": "INTERNAL ", "identifier": "sAMAccountName=anna"}], 403),
    ([{"source": "EXTERNAL", "identifier": "sAMAccountName=anna"}], 403),
    ([{"source": "INTERNAL", "identifier": "xsAMAccountName=anna"}], 403),
])
def test_decide_solicitor_denies(values, status):
    d = decide_solicitor(policy(), values)
    assert (d.allow, d.status) == (False, status)


def test_decide_solicitor_allows():
    d = decide_solicitor(policy(), [{**SOL, "attributes": {}}])
    assert d.allow and "INTERNAL:sAMAccountName=anna" in d.reason
    assert decide_solicitor(policy(), [{"source": "INTERNAL", "identifier": "sAMAccountName="}]).allow


def test_decide_order_scope():
    p = policy()
    assert decide_order_scope(p, SOL).allow
    for sol in (None, {}, {"source": "EXTERNAL", "identifier": "1"}, {"source": "INTERNAL", "identifier": 1}):
        d = decide_order_scope(p, sol)
        assert (d.allow, d.status) == (False, 404)


def test_decide_anonymize():
    star = policy(allow=["anonymize_user"], anonymize=["*"])
    glob = policy(allow=["anonymize_user"], anonymize=["EXTERNAL:19*"])
    for name in ("internalId", "ldapSearch"):
        assert decide_anonymize(star, {name: ["x"]}).allow
        assert (decide_anonymize(glob, {name: ["x"]}).status, decide_anonymize(glob, {name: ["x"]}).allow) == (403, False)
    assert decide_anonymize(glob, {"externalId": ["EXTERNAL:198603052385"]}).allow
    assert decide_anonymize(star, {"externalId": ["INTERNAL:anything"]}).allow
    for value in ("EXTERNAL:200001011234", "external:19", "INTERNAL:19x"):
        assert decide_anonymize(glob, {"externalId": [value]}).status == 403
    denied = [
        {"externalId": [19]}, {}, {"internalId": []}, {"internalId": ["a"], "externalId": ["EXTERNAL:19"]},
        {"internalId": ["a", "b"]}, {"externalId": ["EXTERNAL:19", "EXTERNAL:19"]},
        {"internalId": ["a"], "extra": [""]}, {"InternalId": ["a"]},
    ]
    for fields in denied:
        d = decide_anonymize(star, fields)
        assert (d.allow, d.status) == (False, 400), fields


# -- match.issuer ------------------------------------------------------------------------------------
def test_issuer_pins_the_client_to_its_ca():
    p = policy(match={"subject": "CN=svc,O=x", "issuer": ["CN=ca", "CN=Partner CA,O=Acme"]})
    assert p.matches(ident()) and p.matches(ident(issuer="CN=Partner CA,O=Acme"))
    assert not p.matches(ident(issuer="CN=other"))
    assert not p.matches(ident(issuer="cn=ca"))                 # exact, as subject is
    assert not p.matches(ident(issuer="O=Acme,CN=Partner CA"))  # RFC 4514 order: most specific first


def test_issuer_alone_is_refused_and_says_why():
    with pytest.raises(SettingsError) as info:
        policy(match={"issuer": "CN=ca"})
    assert info.value.key == "match.issuer" and "every certificate" in info.value.message


# -- overlapping policies ------------------------------------------------------------------------------
FP2 = ":".join(["CD"] * 32)


@pytest.mark.parametrize("a, b, overlap", [
    ({"subject": "CN=a,O=x"}, {"subject": "CN=b,O=x"}, False),
    ({"subject": "CN=a,O=x"}, {"subject": ["CN=b,O=x", "CN=a,O=x"]}, True),
    ({"subject": "CN=a,O=x"}, {"common_name": "b"}, False),              # the subject implies CN a
    ({"subject": "CN=a,O=x"}, {"common_name": ["b", "a"]}, True),
    ({"subject": "O=x"}, {"common_name": "a"}, False),                   # no CN: no common_name
    ({"subject": "CN=a,CN=b"}, {"common_name": "a"}, False),             # two CNs: no common_name
    ({"subject": "cn=a,O=x"}, {"common_name": "a"}, False),              # not as rendered: implies nothing
    ({"subject": "CN=a\\,b,O=x"}, {"common_name": "a,b"}, True),        # escapes read back
    ({"subject": "CN=a,O=x", "common_name": "b"}, {"common_name": "c"}, False),   # A matches nothing
    ({"common_name": "a"}, {"common_name": "b"}, False),
    ({"common_name": "a"}, {"san_uri": "spiffe://x/a"}, False),         # different keys: a warning
    ({"san_dns": "a.x"}, {"san_dns": "b.x"}, False),                    # two names: the ordinary case
    ({"san_dns": ["a.x", "c.x"]}, {"san_dns": ["b.x", "c.x"]}, True),
    ({"san_email": "a@x"}, {"san_uri": "spiffe://x/a"}, False),
    ({"fingerprint_sha256": FP}, {"fingerprint_sha256": FP2}, False),
    ({"fingerprint_sha256": FP}, {"subject": "CN=a,O=x"}, False),       # different keys: a warning
    ({"fingerprint_sha256": FP, "subject": "CN=a,O=x"}, {"subject": "CN=a,O=x"}, True),
    ({"subject": "CN=a,O=x", "issuer": "CN=ca1"}, {"subject": "CN=a,O=x", "issuer": "CN=ca2"}, False),
    ({"subject": "CN=a,O=x", "issuer": "CN=ca1"}, {"subject": "CN=a,O=x", "issuer": ["CN=ca2", "CN=ca1"]}, True),
    ({"subject": "CN=a,O=x", "issuer": "CN=ca1"}, {"subject": "CN=b,O=x", "issuer": "CN=ca1"}, False),
    ({"subject": "CN=a,O=x", "issuer": "CN=ca1"}, {"subject": "CN=a,O=x"}, True),     # B takes any CA
    ({"san_uri": "spiffe://x/a", "issuer": "CN=ca1"}, {"common_name": "a", "issuer": "CN=ca2"}, False),
    ({"san_dns": "a.x", "issuer": "CN=ca1"}, {"san_dns": "a.x", "subject": "CN=b,O=x"}, True),
    ({"san_dns": "a.x", "subject": "CN=a,O=x"}, {"san_dns": "a.x", "subject": "CN=b,O=x"}, False),
])
def test_overlaps(a, b, overlap):
    pa, pb = policy(client="a", match=a), policy(client="b", match=b)
    assert overlaps(pa, pb) is overlap and overlaps(pb, pa) is overlap
    assert find_overlaps([pa, pb]) == ([(pa, pb)] if overlap else [])


def _names() -> list[x509.Name]:
    attr = x509.NameAttribute
    org = attr(NameOID.ORGANIZATION_NAME, "x")   # O first: the rendering reads "CN=a,O=x"
    return [x509.Name([org, attr(NameOID.COMMON_NAME, cn)]) for cn in ("a", "b", "a,b")] + [
        x509.Name([org]), x509.Name([attr(NameOID.COMMON_NAME, "a"), attr(NameOID.COMMON_NAME, "b")])]


def _identities() -> list[Identity]:
    """Certificates as identity.py reads them: the common name taken from the subject, not guessed."""
    out = []
    for name, issuer, dns, fp in itertools.product(_names(), ("CN=ca1", "CN=ca2"), ((), ("a.x",), ("a.x", "b.x")),
                                                   (FP_CANON, FP2)):
        cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        out.append(Identity(name.rfc4514_string(), str(cns[0].value) if len(cns) == 1 else None, dns, (), (), fp,
                            "1", issuer, NOW, NOW))
    return out


IDENTITIES = _identities()
VALUES = {"subject": [n.rfc4514_string() for n in _names()] + ["cn=a,O=x"], "issuer": ["CN=ca1", "CN=ca2"],
          "common_name": ["a", "b", "a,b"], "san_dns": ["a.x", "b.x"], "fingerprint_sha256": [FP_CANON, FP2]}
matches = st.dictionaries(st.sampled_from(list(VALUES)), st.integers(0, 10), min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.lists(st.sampled_from(VALUES[k]), min_size=1, max_size=2, unique=True)
                                        for k in keys}))


@settings(max_examples=400, deadline=None)
@given(matches, matches)
def test_two_policies_one_certificate_matches_are_an_error_or_a_warning(a, b):
    """Soundness: whenever some certificate matches both, check says so: an error when they share a
    value, a warning when they match on different keys; only same keys with other values (two
    certificates' SANs that one certificate could both carry) go unreported."""
    assume(set(a) != {"issuer"} and set(b) != {"issuer"})
    pa, pb = policy(client="a", match=a), policy(client="b", match=b)
    both = [i for i in IDENTITIES if pa.matches(i) and pb.matches(i)]
    shared = any(k != "issuer" and set(v) & set(b.get(k, ())) for k, v in a.items())
    if both and shared:
        assert overlaps(pa, pb), both[0]
    if both and not overlaps(pa, pb):
        assert may_overlap(pa, pb) or set(a) - {"issuer"} == set(b) - {"issuer"}, both[0]
    assert not (overlaps(pa, pb) and may_overlap(pa, pb))


def test_overlapping_files_are_a_problem_naming_both(tmp_path):
    (tmp_path / "hr.yaml").write_text(yaml.safe_dump({**BASE, "client": "hr", "match": {"common_name": "svc"}}))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**BASE, "client": "other", "match": {"common_name": "z"}}))
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump(BASE))     # CN=svc,O=x: hr's common name
    problems = check_policies(tmp_path)
    assert len(problems) == 1 and problems[0].key == "match"
    assert Path(problems[0].file).name == "svc.yaml" and str(tmp_path / "hr.yaml") in problems[0].message
    with pytest.raises(SettingsError) as info:
        load_policies(tmp_path)
    assert str(info.value) == str(problems[0])
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump({**BASE, "match": {"subject": "CN=svc,O=x", "issuer": "CN=b"}}))
    (tmp_path / "hr.yaml").write_text(yaml.safe_dump({**BASE, "client": "hr", "match": {"common_name": "svc",
                                                                                       "issuer": "CN=a"}}))
    assert check_policies(tmp_path) == []     # pinned to different CAs: told apart
