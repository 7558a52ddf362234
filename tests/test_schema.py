"""`gateway schema config|policy`: the JSON Schema editors validate the files with agrees with the loader.

The committed schema files are what the command prints; the committed config and policy files carry
a yaml-language-server modeline naming them; and on good and bad documents alike, the schema and the
loader reach the same verdict (a table for config.yaml, random documents for policy files).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gateway_command
from gateway.core.errors import SettingsError
from gateway.core.operations import Operation
from gateway.core.policy import MATCH_KEYS, PERIODS, SOURCES, parse_policy
from gateway.core.policy_schema import policy_schema
from gateway.shell.settings import config_schema, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = jsonschema.Draft202012Validator(config_schema())
POLICY = jsonschema.Draft202012Validator(policy_schema())
OPERATIONS = [op.value for op in Operation]


def schema_says(validator, document) -> bool:
    return validator.is_valid(json.loads(json.dumps(document)))


@pytest.mark.parametrize("kind, make", [("config", config_schema), ("policy", policy_schema)])
def test_the_command_prints_the_committed_schema_and_it_is_one(tmp_path, kind, make):
    proc = subprocess.run(gateway_command("schema", kind), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    printed = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed == make()
    committed = ROOT / "schema" / f"{kind}.schema.json"
    assert json.loads(committed.read_text()) == printed, f"regenerate it: gateway schema {kind} > {committed}"


@pytest.mark.parametrize("path, kind", [
    ("config.yaml", "config"), ("deploy/container-config.yaml", "config"),
    *[(str(p.relative_to(ROOT)), "policy") for p in sorted((ROOT / "policies").glob("*.yaml"))],
])
def test_committed_files_name_their_schema_and_follow_it(path, kind):
    text = (ROOT / path).read_text()
    first = text.splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema="), first
    target = (ROOT / path).parent / first.split("=", 1)[1].strip()
    assert target.resolve() == (ROOT / "schema" / f"{kind}.schema.json").resolve()
    errors = [e.message for e in (CONFIG if kind == "config" else POLICY).iter_errors(yaml.safe_load(text))]
    assert not errors, errors


def test_the_schema_describes_every_key():
    def walk(node, where=""):
        for name, sub in node.get("properties", {}).items():
            yield f"{where}{name}", sub
            inner = next((b for b in sub.get("anyOf", [sub]) if "properties" in b), None)
            if inner is not None and name != "rate_limit":
                yield from walk(inner, f"{where}{name}.")

    undocumented = [key for key, sub in walk(config_schema()) if not sub.get("description")]
    assert not undocumented, undocumented


CONFIG_CASES = [
    ({}, True),
    ({"listen": {"host": "127.0.0.1", "port": 8443}, "tls": None, "audit": {"redact": ["remote"]}}, True),
    ({"listen": {"port": 8443.0}}, True),
    ({"identity_token": None}, True),
    ({"identity_token": {"key": "k.pem", "ttl_s": 30}}, True),
    ({"reload": {"watch_s": 0}}, True),
    ({"upstream": {"url": "https://sign.example/api", "max_connections": 1}}, True),
    ({"reference_api": {"listen": "[::1]:8081"}}, True),
    ({"reference_api": {"listen": "::1:8081"}}, True),
    ({"reference_api": {"listen": "127.0.0.1:65535"}}, True),
    ({"reference_api": {"listen": "127.0.0.1:65536"}}, False),
    ({"reference_api": {"listen": "127.0.0.1:99999"}}, False),
    ({"reference_api": {"listen": "127.0.0.1:8081\n"}}, False),
    ({"upstream": {"url": "embedded\n"}}, False),
    ({"reload": {"watch_s": math.nan}}, False),
    ({"limits": {"header_timeout_s": math.inf}}, False),
    ({"colour": "blue"}, False),
    ({"tls": {"colour": "blue"}}, False),
    ({"listen": {"port": "x"}}, False),
    ({"listen": {"port": 70000}}, False),
    ({"listen": {"port": True}}, False),
    ({"listen": {"port": 1.5}}, False),
    ({"tls": {"crl_check": "sometimes"}}, False),
    ({"tls": {"x509_strict": "yes"}}, False),
    ({"tls": {"cert": ""}}, False),
    ({"reload": {"watch_s": -1}}, False),
    ({"upstream": {"timeout_s": 0}}, False),
    ({"upstream": {"url": "ftp://x"}}, False),
    ({"upstream": {"max_connections": 0}}, False),
    ({"limits": {"max_connections": 0}}, False),
    ({"identity_token": {"ttl_s": 0}}, False),
    ({"reference_api": {"listen": "8081"}}, False),
    ({"audit": {"sync": "never"}}, False),
    ({"audit": {"redact": "remote"}}, False),
    ({"rate_limit": {"on_storage_error": "ignore"}}, False),
    ({"listen": []}, False),
]


@pytest.mark.parametrize("document, good", CONFIG_CASES, ids=[json.dumps(d) for d, _ in CONFIG_CASES])
def test_config_schema_and_loader_agree(tmp_path, document, good):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
        loaded = True
    except SettingsError:
        loaded = False
    assert loaded == good
    if "nan" not in json.dumps(document).lower() and "infinity" not in json.dumps(document).lower():
        assert schema_says(CONFIG, document) == good   # JSON has no NaN or infinity: an editor never sees one


# -- policy files: random documents, good and bad -------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=4)
numbers = st.one_of(st.integers(-2, 100), st.floats(-1, 100, allow_nan=False), st.booleans(), text, st.none())
fingerprint = st.lists(st.sampled_from("0123456789abcdefABCDEF"), min_size=63, max_size=65).map("".join)
fingerprints = st.one_of(fingerprint, fingerprint.map(lambda h: ":".join(h[i:i + 2] for i in range(0, len(h), 2))))
match_value = st.one_of(text, st.lists(st.one_of(text, st.integers()), max_size=3), st.integers(), st.none(),
                        fingerprints, st.lists(fingerprints, min_size=1, max_size=2))
rate = st.dictionaries(st.sampled_from([*PERIODS, "burst", "every"]), numbers, max_size=3)
solicitor = st.one_of(
    st.fixed_dictionaries({"source": st.sampled_from([*SOURCES, "SOMEONE"]), "identifier": st.one_of(text, st.integers())}),
    st.dictionaries(st.sampled_from(["source", "identifier", "name"]), text, max_size=3),
    text,
)
any_values = st.fixed_dictionaries({}, optional={
    "client": st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,5}", fullmatch=True), text, st.integers()),
    "match": st.one_of(st.dictionaries(st.sampled_from([*MATCH_KEYS, "colour"]), match_value, max_size=3), text),
    "allow": st.one_of(st.lists(st.sampled_from([*OPERATIONS, "fly"]), max_size=4), st.none(), text),
    "solicitors": st.one_of(st.none(), st.lists(solicitor, max_size=3), text),
    "anonymize": st.one_of(st.none(), st.lists(st.one_of(text, st.integers()), max_size=3), st.integers(), text),
    "rate_limit": st.one_of(st.none(), rate, rate.flatmap(lambda r: st.fixed_dictionaries(
        {"operations": st.one_of(st.none(), st.dictionaries(st.sampled_from([*OPERATIONS, "fly"]),
                                                            st.one_of(rate, text), max_size=2), text)},
        optional={k: st.just(v) for k, v in r.items()}))),
    "max_upload_bytes": numbers,
    "mode": st.sampled_from(["enforce", "report", "audit", None]),
    "colour": st.just("blue"),
})
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1,
                max_size=4)
good_rate = st.builds(lambda period, n, burst: {period: n, **burst}, st.sampled_from(list(PERIODS)),
                      st.one_of(st.integers(1, 100), st.floats(0.01, 100)),
                      st.one_of(st.just({}), st.integers(1, 50).map(lambda b: {"burst": b})))
good_documents = st.fixed_dictionaries({
    "client": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,5}", fullmatch=True),
    "match": st.one_of(
        st.dictionaries(st.sampled_from([k for k in MATCH_KEYS if k != "fingerprint_sha256"]),
                        st.one_of(words, st.lists(words, min_size=1, max_size=2)), min_size=1, max_size=3),
        st.builds(lambda f: {"fingerprint_sha256": f}, fingerprint.filter(lambda h: len(h) == 64))),
    "allow": st.lists(st.sampled_from(OPERATIONS), max_size=6),
    "solicitors": st.lists(st.fixed_dictionaries({"source": st.sampled_from(SOURCES), "identifier": words}),
                           min_size=1, max_size=2),
    "anonymize": st.lists(words, min_size=1, max_size=2),
}, optional={
    "rate_limit": st.fixed_dictionaries({}, optional={
        "per_minute": st.integers(1, 100), "operations": st.dictionaries(st.sampled_from(OPERATIONS), good_rate,
                                                                          max_size=2)}),
    "max_upload_bytes": st.integers(1, 10**9),
    "mode": st.sampled_from(["enforce", "report"]),
})
# A good document, or one with a key or two changed to anything, or taken out.
policy_documents = st.builds(
    lambda good, changed, dropped: {k: v for k, v in {**good, **changed}.items() if k not in dropped},
    good_documents, st.one_of(st.just({}), any_values),
    st.one_of(st.just(set()), st.sets(st.sampled_from(["client", "match", "solicitors", "anonymize"]), max_size=2)))


def loader_says(document) -> bool:
    try:
        parse_policy(document, "policy.yaml")
        return True
    except SettingsError:
        return False


def test_policy_schema_and_loader_agree_on_any_document():
    verdicts = set()

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(policy_documents)
    def agree(document):
        verdict = loader_says(document)
        verdicts.add(verdict)
        assert schema_says(POLICY, document) == verdict, document

    agree()
    assert verdicts == {True, False}   # the documents were both good and bad


@pytest.mark.parametrize("document", [
    {"client": "a", "match": {"subject": "CN=a"}},
    {"client": "a", "match": {"common_name": ["a", "b"]}, "allow": ["read_order"],
     "solicitors": [{"source": "EXTERNAL", "identifier": "19*"}], "rate_limit": {"per_minute": 60, "burst": 10.0,
     "operations": {"create_order": {"per_hour": 5}}}, "max_upload_bytes": 1000, "mode": "report"},
    {"client": "a", "match": {"fingerprint_sha256": "AB:" * 31 + "AB"}, "allow": ["anonymize_user"],
     "anonymize": ["*"], "rate_limit": {"operations": {"anonymize_user": {"per_second": 0.5}}}},
])
def test_good_policies_pass_both(document):
    assert schema_says(POLICY, document) and loader_says(document)


@pytest.mark.parametrize("document", [
    {"client": "a", "match": {}},
    {"client": "a b", "match": {"subject": "CN=a"}},
    {"client": "a\n", "match": {"subject": "CN=a"}},
    {"client": "a", "match": {"subject": "CN=a"}, "allow": ["read_order"]},            # no solicitors
    {"client": "a", "match": {"subject": "CN=a"}, "allow": ["anonymize_user"], "anonymize": []},
    {"client": "a", "match": {"subject": "CN=a"}, "rate_limit": {"burst": 3}},         # no period
    {"client": "a", "match": {"subject": "CN=a"}, "rate_limit": {"per_second": 1, "per_minute": 60}},
    {"client": "a", "match": {"subject": "CN=a"}, "rate_limit": {"per_second": math.inf}},
    {"client": "a", "match": {"subject": "CN=a"}, "anonymize": ""},
    {"client": "a", "match": {"subject": "CN=a"}, "rate_limit": {"operations": []}},
    {"client": "a", "match": {"fingerprint_sha256": "AB"}},
])
def test_bad_policies_fail_both(document):
    assert not loader_says(document)
    if not any(isinstance(v, float) and math.isinf(v) for v in (document.get("rate_limit") or {}).values()):
        assert not schema_says(POLICY, document)   # JSON has no infinity: an editor never sees one
