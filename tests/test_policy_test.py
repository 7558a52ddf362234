"""`gateway policy test`: the committed cases pass, a policy change is caught, untested grants are named."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, gateway_command


def policy_test(*args: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    done = subprocess.run(gateway_command("policy", "test", *args), cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the committed config, policies, their tests and the example PKI, to change freely."""
    for name in ("config.yaml", "directory.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    shutil.copytree(ROOT / "certs.example", tmp_path / "certs.example")
    return tmp_path


def test_the_committed_cases_pass_and_exercise_every_grant():
    code, out, err = policy_test()
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "24 passed, 0 failed"
    assert "rules no case exercised" not in out


def test_a_policy_change_is_caught_by_a_failing_case(project):
    crm = project / "policies" / "crm.yaml"
    crm.write_text(crm.read_text().replace("allow: [create_order,", "allow: [delete_order, create_order,"))
    code, out, _ = policy_test(cwd=project)
    assert code == 1
    assert ("FAIL policies/tests/crm.yaml: may not delete orders, not even an external customer's: "
            "expected deny 403 operation_not_allowed, got allow") in out
    assert out.strip().splitlines()[-1] == "23 passed, 1 failed"


def test_grants_no_case_exercises_are_named(project):
    hr = project / "policies" / "hr-system.yaml"
    hr.write_text(hr.read_text().replace('  - {source: INTERNAL, identifier: "sAMAccountName=*"}',
                                         '  - {source: INTERNAL, identifier: "sAMAccountName=*"}\n'
                                         '  - {source: EXTERNAL, identifier: "2001*"}'))
    code, out, _ = policy_test(cwd=project)
    assert code == 0
    assert out.splitlines()[-2:] == ["rules no case exercised:", "  hr-system: solicitor EXTERNAL:2001*"]


def test_report_mode_is_an_expectation_of_its_own(project):
    crm = project / "policies" / "crm.yaml"
    crm.write_text(crm.read_text().replace("mode: enforce", "mode: report"))
    cases = project / "report.yaml"
    cases.write_text(json.dumps({"cases": [
        {"name": "would deny", "identity": {"subject": "CN=crm,O=gateway example"},
         "request": {"method": "POST", "path": "/anonymize", "fields": {"externalId": "EXTERNAL:1"}},
         "expect": {"allow": True, "would_deny": "anonymize_not_allowed"}},  # the last denial noted
        {"name": "plain allow is not enough", "identity": {"subject": "CN=crm,O=gateway example"},
         "request": {"method": "POST", "path": "/anonymize", "fields": {"externalId": "EXTERNAL:1"}},
         "expect": "allow"},
    ]}))
    code, out, _ = policy_test(str(cases), "--format", "json", cwd=project)
    report = json.loads(out)
    assert code == 1 and report["passed"] == 1 and report["failed"] == 1
    assert report["failures"] == [{"file": "report.yaml", "case": "plain allow is not enough", "expected": "allow",
                                   "actual": "allow (would deny anonymize_not_allowed)"}]


def test_identity_fields_name_the_issuer_for_a_pinned_policy(project):
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((project / "certs.example" / "ca.crt").read_bytes()).subject.rfc4514_string()
    crm = project / "policies" / "crm.yaml"
    crm.write_text(crm.read_text().replace('  subject: "CN=crm,O=gateway example"',
                                           f'  subject: "CN=crm,O=gateway example"\n  issuer: "{ca}"'))
    state = {"method": "GET", "path": "/orders/7b2a9c1e-0d3f-4a5b-8c6d-1e2f3a4b5c6d/state",
             "order_solicitor": {"source": "EXTERNAL", "identifier": "1"}}
    cases = project / "pinned.yaml"
    cases.write_text(json.dumps({"cases": [
        {"name": "its CA", "identity": {"subject": "CN=crm,O=gateway example", "issuer": ca}, "request": state,
         "expect": "allow"},
        {"name": "another CA", "identity": {"subject": "CN=crm,O=gateway example", "issuer": "CN=Partner CA"},
         "request": state, "expect": {"deny": 403, "reason": "unknown_client"}},
        {"name": "the committed certificate", "identity": {"cert": "certs.example/clients/crm.crt"},
         "request": state, "expect": "allow"},
    ]}))
    code, out, err = policy_test(str(cases), cwd=project)
    assert code == 0 and out.splitlines()[0] == "3 passed, 0 failed", out + err


@pytest.mark.parametrize("content, key", [
    ("cases: []", "cases"),
    ("cases: [{identity: {subject: x}, request: {method: GET, path: /}, expect: maybe}]", "cases[0].expect"),
    ("cases: [{identity: {colour: red}, request: {method: GET, path: /}, expect: allow}]", "cases[0].identity"),
    ("cases: [{identity: {cert: nowhere.pem}, request: {method: GET, path: /}, expect: allow}]",
     "cases[0].identity.cert"),
    ("cases: [{identity: {subject: x}, request: {path: /}, expect: allow}]", "cases[0].request"),
    ("cases: [{identity: {subject: x}, request: {method: GET, path: /}, expect: {deny: 403, reason: nope}}]",
     "cases[0].expect.reason"),
    ("cases: [{identity: {subject: x}, request: {method: GET, path: /}}]", "cases[0].expect"),
    ("cases: [: bad yaml", ""),
])
def test_an_unusable_test_file_is_exit_2_naming_file_and_key(project, content, key):
    bad = project / "bad.yaml"
    bad.write_text(content)
    code, out, err = policy_test(str(bad), cwd=project)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{bad}: {key}" in err


def test_no_test_files_is_exit_2(project):
    shutil.rmtree(project / "policies" / "tests")
    code, _, err = policy_test(cwd=project)
    assert code == 2 and "no such test file or folder" in err
