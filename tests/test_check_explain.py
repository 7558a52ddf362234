"""`gateway check` and `gateway policy explain`, run as real commands (docs/operating.md, docs/configuration.md)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import free_port, gateway_command
from gateway.tools import pki
from gateway_harness import POLICIES, write_config

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)
UPSTREAM = "http://127.0.0.1:9"
PEM = Encoding.PEM
GUID = "22222222-2222-4222-8222-222222222222"
EXTERNAL = '{"source":"EXTERNAL","identifier":"198603052385","attributes":{}}'
INTERNAL = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom","attributes":{}}'


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(gateway_command(*args), cwd=cwd, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def check(config: Path, cwd: Path | None = None) -> tuple[int, str, list[str]]:
    proc = run("check", "-c", str(config), cwd=cwd or config.parent)
    return proc.returncode, proc.stdout, proc.stderr.splitlines()


def line_with(lines: list[str], *parts: str) -> str:
    """The one output line containing every part."""
    found = [line for line in lines if all(p in line for p in parts)]
    assert len(found) == 1, (parts, lines)
    return found[0]


def config(tmp_path: Path, test_pki, tls: dict | None = None, policies: dict | None = None, **sections) -> Path:
    base = {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
            "client_ca": str(test_pki.ca), "crl": str(test_pki.dir / "crl.pem")}
    return write_config(tmp_path, test_pki, UPSTREAM, policies, tls={**base, **(tls or {})}, **sections).resolve()


def fails_with(path: Path, *parts: str) -> str:
    rc, out, err = check(path)
    assert rc == 1 and "OK" not in out, (rc, out, err)
    return line_with(err, str(path), *parts)


# -- gateway check: the config file ---------------------------------------------------------
def test_committed_config_is_ok(tmp_path):
    rc, out, err = check(ROOT / "config.yaml", cwd=tmp_path)  # its paths are relative to its folder, not the cwd
    assert (rc, out.strip()) == (0, "OK"), err


@pytest.mark.parametrize("text, key, message", [
    ("listen: {port: 8443}\ncolour: blue\n", ": colour:", "unknown key"),
    ("tls: {colour: blue}\n", ": tls.colour:", "unknown key"),
    ('listen: {port: "x"}\n', ": listen.port:", "must be a non-negative integer"),
    ("tls: {crl_check: sometimes}\n", ": tls.crl_check:", "must be one of leaf, chain"),
    ("listen: {port: 1}\ntls: cert: x\n", ": not valid YAML", "at line 2"),
], ids=["unknown-top-level-key", "unknown-nested-key", "bad-type", "bad-choice", "invalid-yaml"])
def test_config_file_problem(tmp_path, text, key, message):
    (tmp_path / "config.yaml").write_text(text)
    assert message in fails_with((tmp_path / "config.yaml").resolve(), key)


def test_missing_config_file(tmp_path):
    assert "cannot read" in fails_with((tmp_path / "nowhere.yaml").resolve())


# -- gateway check: policy files ----------------------------------------------------------------
def test_two_bad_policy_files_give_two_lines(tmp_path, test_pki):
    bad = {**POLICIES, "crm": {**POLICIES["crm"], "colour": "blue"},
           "lawyer": {**POLICIES["lawyer"], "allow": ["anonymize_user", "launch_rockets"]}}
    path = config(tmp_path, test_pki, policies=bad)
    rc, out, err = check(path)
    assert rc == 1 and "OK" not in out
    folder = path.parent / "policies"
    assert "unknown key" in line_with(err, f"{folder / 'crm.yaml'}: colour:")
    assert "unknown operation 'launch_rockets'" in line_with(err, f"{folder / 'lawyer.yaml'}: allow[1]:")
    assert len(err) == 2 + sum(line.startswith("warning:") for line in err), err


def test_client_name_used_twice(tmp_path, test_pki):
    path = config(tmp_path, test_pki, policies={**POLICIES, "crm2": {**POLICIES["crm"], "match": {"common_name": "x"}}})
    rc, _, err = check(path)
    folder = path.parent / "policies"
    line = line_with(err, f"{folder / 'crm2.yaml'}: client:")
    assert rc == 1 and "'crm'" in line and str(folder / "crm.yaml") in line


def no_policy_folder(tmp_path: Path, test_pki) -> Path:
    path = config(tmp_path, test_pki)
    path.write_text(json.dumps({**json.loads(path.read_text()), "policies": "no-such-folder"}))
    return path


def test_policy_folder_missing(tmp_path, test_pki):
    path = no_policy_folder(tmp_path, test_pki)
    rc, _, err = check(path)
    assert rc == 1 and "is not a folder of policy files" in line_with(err, str(path.parent / "no-such-folder"))


def test_policy_folder_missing_names_config_key(tmp_path, test_pki):
    fails_with(no_policy_folder(tmp_path, test_pki), ": policies:", "no-such-folder")


def test_ldap_directory_is_not_a_path_but_its_files_are_checked(tmp_path, test_pki):
    ref = {"listen": "127.0.0.1:8081", "data_dir": "data",
           "directory": "ldaps://ldap.example.com:636/ou=people,dc=example,dc=com",
           "ldap": {"bind_dn": "cn=gw,dc=example,dc=com", "password_file": str(tmp_path / "no-password")}}
    path = write_config(tmp_path, test_pki, "embedded", reference_api=ref).resolve()
    line = fails_with(path, ": reference_api.ldap.password_file:", "no-password")
    assert "does not exist" in line
    rc, out, err = check(path)
    assert not [e for e in err if "reference_api.directory" in e], err   # a URL is not a missing file
    (tmp_path / "no-password").write_text("secret\n")
    rc, out, err = check(path)
    assert not [e for e in err if "reference_api" in e], err


# -- gateway check: TLS files ---------------------------------------------------------------------
def test_tls_cert_missing(tmp_path, test_pki):
    path = config(tmp_path, test_pki, tls={"cert": str(tmp_path / "missing.crt")})
    assert "does not exist" in fails_with(path, ": tls.cert:", "missing.crt")


def test_tls_key_does_not_match_cert(tmp_path, test_pki):
    other_key = test_pki.client("crm")[1]
    path = config(tmp_path, test_pki, tls={"key": str(other_key)})
    assert "do not belong together" in fails_with(path, "tls.key", str(other_key))


def test_client_ca_is_not_a_certificate(tmp_path, test_pki):
    path = config(tmp_path, test_pki, tls={"client_ca": str(test_pki.dir / "server.key")})
    assert "no usable CA certificate" in fails_with(path, ": tls.client_ca:", "server.key")


def test_crl_is_not_a_crl(tmp_path, test_pki):
    path = config(tmp_path, test_pki, tls={"crl": str(test_pki.ca)})
    assert "no PEM CRL" in fails_with(path, ": tls.crl:", str(test_pki.ca))


def test_chain_check_needs_a_crl_for_every_ca(tmp_path, test_pki):
    second_cert, second_key = pki.make_ca("second CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(test_pki.ca.read_bytes() + second_cert.public_bytes(PEM))
    path = config(tmp_path, test_pki, tls={"client_ca": str(bundle), "crl_check": "chain"})
    line = fails_with(path, ": tls.crl:")
    assert "every CA" in line and second_cert.subject.rfc4514_string() in line
    assert "CN=" + pki.CA_CN not in line  # the first CA has its CRL
    # With the second CA's CRL added, the chain check passes.
    second_crl = pki.make_crl(second_cert, second_key, number=1, last_update=NOW - DAY, next_update=NOW + 7 * DAY)
    (tmp_path / "crls.pem").write_bytes((test_pki.dir / "crl.pem").read_bytes() + second_crl.public_bytes(PEM))
    tls = {"client_ca": str(bundle), "crl": str(tmp_path / "crls.pem"), "crl_check": "chain"}
    rc, out, err = check(config(tmp_path, test_pki, tls=tls))
    assert (rc, out.strip()) == (0, "OK"), err


def test_crl_past_next_update(tmp_path, test_pki):
    ca_cert, ca_key = pki.load_ca(test_pki.dir)
    stale = tmp_path / "stale.pem"
    pki.write_pem(stale, pki.make_crl(ca_cert, ca_key, number=99, last_update=NOW - 10 * DAY, next_update=NOW - DAY))
    assert "nextUpdate" in fails_with(config(tmp_path, test_pki, tls={"crl": str(stale)}), ": tls.crl:", "stale.pem")


def test_server_cert_expiring_soon_is_a_warning(tmp_path, test_pki):
    ca_cert, ca_key = pki.load_ca(test_pki.dir)
    cert, key = pki.make_server_cert(ca_cert, ca_key, not_before=NOW - DAY, not_after=NOW + 5 * DAY)
    pki.write_pem(tmp_path / "soon.crt", cert)
    pki.write_pem(tmp_path / "soon.key", key)
    path = config(tmp_path, test_pki, tls={"cert": str(tmp_path / "soon.crt"), "key": str(tmp_path / "soon.key")})
    rc, out, err = check(path)
    assert (rc, out.strip()) == (0, "OK"), err
    line = line_with(err, "warning:", str(path), ": tls.cert:")
    assert cert.subject.rfc4514_string() in line and f"{NOW + 5 * DAY:%Y-%m-%d}" in line


# -- gateway check: the committed example keys on the network ----------------------------------------
EXAMPLE = ROOT / "certs.example"


def reissued_example_ca(tmp_path: Path) -> Path:
    """A new CA certificate made from the committed example CA's key (as a renewal would)."""
    _, key = pki.load_ca(EXAMPLE)
    cert, _ = pki.make_ca("renewed example CA", not_before=NOW - DAY, not_after=NOW + 400 * DAY, key=key)
    pki.write_pem(tmp_path / "renewed-ca.crt", cert)
    pki.write_pem(tmp_path / "renewed-ca.key", key)
    pki.write_pem(tmp_path / "renewed-crl.pem", pki.make_crl(cert, key, number=1, last_update=NOW - DAY,
                                                             next_update=NOW + 30 * DAY))
    return tmp_path / "renewed-ca.crt"


@pytest.mark.parametrize("host, which, warned", [
    ("0.0.0.0", "ca", ["example CA"]),
    ("::", "ca", ["example CA"]),
    ("gateway.example.org", "ca", ["example CA"]),
    ("127.0.0.1", "ca", []),
    ("localhost", "ca", []),
    ("::1", "ca", []),
    ("0.0.0.0", "renewed ca", ["example CA"]),        # the same key in a new certificate
    ("0.0.0.0", "server", ["pose as this gateway"]),
    ("0.0.0.0", None, []),                             # the test PKI's own keys, which are not public
])
def test_the_example_keys_on_the_network_are_a_warning(tmp_path, test_pki, host, which, warned):
    tls = {}
    if which == "ca":
        tls = {"client_ca": str(EXAMPLE / "ca.crt"), "crl": str(EXAMPLE / "crl.pem")}
    elif which == "renewed ca":
        tls = {"client_ca": str(reissued_example_ca(tmp_path)), "crl": str(tmp_path / "renewed-crl.pem")}
    elif which == "server":
        tls = {"cert": str(EXAMPLE / "server.crt"), "key": str(EXAMPLE / "server.key")}
    path = config(tmp_path, test_pki, tls=tls, listen={"host": host, "port": 8443})
    rc, out, err = check(path)
    assert (rc, out.strip()) == (0, "OK"), err
    found = [line for line in err if ": listen.host:" in line]
    assert len(found) == len(warned), err
    for line, what in zip(found, warned):
        assert line.startswith("warning: ") and what in line and "private key is public" in line


def test_the_committed_configs_listen_where_they_should():
    import yaml

    assert yaml.safe_load((ROOT / "config.yaml").read_text())["listen"]["host"] == "127.0.0.1"
    assert yaml.safe_load((ROOT / "deploy" / "container-config.yaml").read_text())["listen"]["host"] == "0.0.0.0"


async def test_serve_logs_the_example_keys_at_start_and_on_a_reload_that_brings_them(tmp_path, test_pki, capsys):
    from gateway.runtime import lifecycle
    from gateway.shell import oplog
    from gateway.shell.settings import load_config

    path = config(tmp_path, test_pki, tls={"client_ca": str(EXAMPLE / "ca.crt"), "crl": str(EXAMPLE / "crl.pem")},
                  listen={"host": "0.0.0.0", "port": free_port()})
    running = await lifecycle.start(load_config(path))
    try:
        oplog.drain()
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [e["event"] for e in events][:2] == ["insecure_example_key", "start"], events
        settings = json.loads(path.read_text())
        settings["tls"].update(cert=str(EXAMPLE / "server.crt"), key=str(EXAMPLE / "server.key"))
        path.write_text(json.dumps(settings))
        assert lifecycle.reload(running)
        oplog.drain()
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        exposed = [e["detail"] for e in events if e["event"] == "insecure_example_key"]
        assert len(exposed) == 2 and "pose as this gateway" in exposed[1], events
    finally:
        await lifecycle.stop(running, quiet=True)


# -- gateway check: keys and storage ----------------------------------------------------------------
def test_identity_token_key_not_a_key(tmp_path, test_pki):
    assert fails_with(config(tmp_path, test_pki, identity_token={"key": str(test_pki.ca)}), ": identity_token.key:")


def test_identity_token_key_of_wrong_type(tmp_path, test_pki):
    pki.write_pem(tmp_path / "rsa.key", rsa.generate_private_key(65537, 2048))
    path = config(tmp_path, test_pki, identity_token={"key": str(tmp_path / "rsa.key")})
    assert "P-256" in fails_with(path, ": identity_token.key:")


def test_audit_key_file_too_short(tmp_path, test_pki):
    (tmp_path / "short.key").write_text("only-15-bytes..")
    path = config(tmp_path, test_pki, audit={"path": "data/audit.jsonl", "key_file": "short.key"})
    assert "16 bytes" in fails_with(path, ": audit.key_file:")


@pytest.mark.parametrize("key_file, warned", [
    (None, "not set: the audit chain then shows accidents, not tampering"),
    ("data/audit.key", "is in the audit log's own folder"),
    ("secrets/audit.key", None),
])
def test_audit_without_a_key_kept_apart_is_a_warning(tmp_path, test_pki, key_file, warned):
    for folder in ("data", "secrets"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "audit.key").write_bytes(b"k" * 32)
    path = config(tmp_path, test_pki, audit={"path": "data/audit.jsonl", "key_file": key_file})
    rc, out, err = check(path)
    assert (rc, out.strip()) == (0, "OK"), err
    found = [line for line in err if ": audit.key_file:" in line]
    assert found == ([] if warned is None else [line_with(err, "warning:", warned)])


def test_rate_limit_storage_unknown(tmp_path, test_pki):
    path = config(tmp_path, test_pki, rate_limit={"storage": "memcached://x"})
    assert "memcached://x" in fails_with(path, ": rate_limit.storage:")


# -- gateway policy explain ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explain_config(tmp_path_factory, test_pki) -> Path:
    return write_config(tmp_path_factory.mktemp("explain"), test_pki, UPSTREAM)


def explain(config_path: Path, test_pki, client: str, method: str, path: str, *form: str):
    args = ["policy", "explain", "-c", str(config_path), "--cert", str(test_pki.client(client)[0]),
            "--method", method, "--path", path]
    args += [x for f in form for x in ("--form", f)]
    proc = run(*args, cwd=config_path.parent)
    return proc.returncode, proc.stdout.splitlines()


@pytest.mark.parametrize("form, rc, decision", [
    ([f"solicitor={EXTERNAL}"], 0, "decision: allow"),
    ([f"solicitor={INTERNAL}"], 1, "decision: deny 403"),
    ([], 1, "decision: deny 400: solicitor: is missing"),
    ([f"solicitor={EXTERNAL}", f"solicitor={EXTERNAL}"], 1, "decision: deny 400"),
], ids=["external", "internal", "missing", "repeated"])
def test_explain_create_order(explain_config, test_pki, form, rc, decision):
    got, lines = explain(explain_config, test_pki, "crm", "POST", "/orders", *form)
    assert got == rc, lines
    assert line_with(lines, "client: crm") and line_with(lines, "operation: create_order")
    assert lines[-1].startswith(decision), lines


@pytest.mark.parametrize("method, path, decision", [
    ("DELETE", f"/orders/{GUID}", "decision: deny 403: operation delete_order is not allowed for client crm"),
    ("GET", "/admin/secrets", "decision: deny 404"),
], ids=["not-allowed", "no-operation"])
def test_explain_refused_operation(explain_config, test_pki, method, path, decision):
    rc, lines = explain(explain_config, test_pki, "crm", method, path)
    assert rc == 1 and lines[-1] == decision, lines


def test_explain_stranger(explain_config, test_pki):
    rc, lines = explain(explain_config, test_pki, "stranger", "POST", "/orders", f"solicitor={EXTERNAL}")
    assert rc == 1 and "matches no client policy" in line_with(lines, "client: none")
    assert lines[-1] == "decision: deny 403"


def test_explain_with_overlapping_policies_is_unusable_input(tmp_path, test_pki):
    """Two policies one certificate could match are a settings error, so no certificate is 'both'."""
    twin = {"client": "twin", "match": {"common_name": ["crm", "twin"]}, "allow": ["order_state"],
            "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}
    path = write_config(tmp_path, test_pki, UPSTREAM, {"crm": POLICIES["crm"], "twin": twin}).resolve()
    proc = explain_run(path, test_pki.client("crm")[0])
    folder = path.parent / "policies"
    assert proc.returncode == 2 and not proc.stdout, proc
    assert str(folder / "crm.yaml") in proc.stderr and str(folder / "twin.yaml") in proc.stderr


def test_explain_a_certificate_two_policies_on_different_keys_match(tmp_path, test_pki):
    """Not told apart (check warns): the certificate that carries both is nobody's, as when serving."""
    twin = {"client": "twin", "match": {"san_uri": "spiffe://gateway.example/crm"}, "allow": ["order_state"],
            "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}
    path = write_config(tmp_path, test_pki, UPSTREAM, {"crm": POLICIES["crm"], "twin": twin}).resolve()
    proc = explain_run(path, test_pki.client("crm")[0])
    assert proc.returncode == 1, proc
    assert "more than one client policy (crm, twin)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "decision: deny 403"


def test_explain_order_state(explain_config, test_pki):
    state = f"/orders/{GUID}/state"
    rc, lines = explain(explain_config, test_pki, "crm", "GET", state)
    assert rc == 3 and lines[-1].startswith("decision: allow"), lines   # allowed if the order is crm's
    assert line_with(lines, "order scope", "--form solicitor=")
    rc, lines = explain(explain_config, test_pki, "crm", "GET", state, f"solicitor={EXTERNAL}")
    assert rc == 0 and lines[-1].startswith("decision: allow"), lines
    rc, lines = explain(explain_config, test_pki, "crm", "GET", state, f"solicitor={INTERNAL}")
    assert rc == 1 and lines[-1] == "decision: deny 404: no such order for this client", lines


def test_explain_anonymize(explain_config, test_pki):
    rc, lines = explain(explain_config, test_pki, "lawyer", "POST", "/anonymize", "externalId=EXTERNAL:198603052385")
    assert rc == 0 and line_with(lines, "client: lawyer") and lines[-1].startswith("decision: allow"), lines
    rc, lines = explain(explain_config, test_pki, "lawyer", "POST", "/anonymize", "externalId=EXTERNAL:200001011907")
    assert rc == 1 and lines[-1].startswith("decision: deny 403") and "EXTERNAL:200001011907" in lines[-1], lines


def test_explain_report_mode(tmp_path, test_pki):
    path = write_config(tmp_path, test_pki, UPSTREAM, {**POLICIES, "crm": {**POLICIES["crm"], "mode": "report"}})
    rc, lines = explain(path, test_pki, "crm", "DELETE", f"/orders/{GUID}")
    assert rc == 0 and "mode report" in line_with(lines, "client: crm"), lines
    assert lines[-1].startswith("decision: allow (report mode; would deny 403") and "delete_order" in lines[-1]


def test_explain_form_without_equals(explain_config, test_pki):
    proc = explain_run(explain_config, test_pki.client("crm")[0], "--form", "solicitor")
    assert proc.returncode == 2 and "NAME=VALUE" in proc.stderr and not proc.stdout


def explain_run(config_path: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("policy", "explain", "-c", str(config_path), "--cert", str(cert), "--method", "POST",
               "--path", "/orders", *extra, cwd=config_path.parent)


def test_explain_bad_policy_file_exits_2(tmp_path, test_pki):
    path = write_config(tmp_path, test_pki, UPSTREAM, {"crm": {**POLICIES["crm"], "colour": "blue"}}).resolve()
    proc = explain_run(path, test_pki.client("crm")[0])
    assert proc.returncode == 2 and f"{path.parent / 'policies' / 'crm.yaml'}: colour: unknown key" in proc.stderr
    assert not proc.stdout


def test_explain_missing_cert_file_is_named(explain_config, tmp_path):
    proc = explain_run(explain_config, tmp_path / "nope.crt")
    assert proc.returncode != 0 and "nope.crt" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("command", [
    [], ["serve"], ["reference-api"], ["certs"], ["certs", "init"], ["certs", "issue"], ["certs", "revoke"],
    ["check"], ["policy"], ["policy", "explain"], ["audit"], ["audit", "verify"],
], ids=lambda c: " ".join(c) or "gateway")
def test_help(tmp_path, command):
    proc = run(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gateway"), proc.stderr
    if command == ["policy", "explain"]:
        assert all(opt in proc.stdout for opt in ("--cert", "--method", "--path", "--form"))
