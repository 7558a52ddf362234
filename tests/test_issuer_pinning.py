"""match.issuer with two client CAs, overlapping policies refused, and `policy explain` checking the certificate
as the front door does (docs/policies.md#when-two-policies-overlap, docs/operating.md#commands)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from gateway_harness import ORDER_CRM, POLICIES, gateway_running, session, write_config
from test_check_explain import check, line_with, run
from test_gateway_metrics import scrape, value

from gateway.tools import pki

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
UPSTREAM = "http://127.0.0.1:9"
STATE = f"/orders/{ORDER_CRM}/state"
EXTERNAL = '{"source":"EXTERNAL","identifier":"198603052385"}'
INTERNAL = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom"}'


@dataclass
class TwoCAs:
    root_dn: str            # the test PKI's CA
    partner_dn: str         # a second CA, in the bundle too
    bundle: Path            # both CAs
    crls: Path              # a CRL of each
    partner_crm: tuple[Path, Path]   # "CN=crm,O=gateway example" again, from the partner CA
    inter_crm: Path         # crm from an intermediate under the root that is not in any bundle
    inter_chain: Path       # ... followed by that intermediate, as a client presents it
    inter_crls: Path        # the root's CRL and the intermediate's


@pytest.fixture(scope="module")
def two(tmp_path_factory, test_pki) -> TwoCAs:
    d = tmp_path_factory.mktemp("two-cas")
    root = pki.load_ca(test_pki.dir)
    partner = pki.make_ca("Partner CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    cert, key = pki.make_client_cert(*partner, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    pki.write_pem(d / "partner-crm.crt", cert)
    pki.write_pem(d / "partner-crm.key", key)
    root_crl = (test_pki.dir / "crl.pem").read_bytes()
    (d / "bundle.pem").write_bytes(test_pki.ca.read_bytes() + partner[0].public_bytes(Encoding.PEM))
    (d / "crls.pem").write_bytes(root_crl + pki.make_crl(*partner, number=1, last_update=NOW - DAY,
                                                         next_update=NOW + 10 * DAY).public_bytes(Encoding.PEM))
    inter = pki.make_ca("gateway example issuing CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY, issuer=root,
                        path_length=0)
    leaf, _ = pki.make_client_cert(*inter, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    pki.write_pem(d / "inter-crm.crt", leaf)
    (d / "inter-chain.pem").write_bytes(leaf.public_bytes(Encoding.PEM) + inter[0].public_bytes(Encoding.PEM))
    (d / "inter-crls.pem").write_bytes(root_crl + pki.make_crl(*inter, number=1, last_update=NOW - DAY,
                                                               next_update=NOW + 10 * DAY).public_bytes(Encoding.PEM))
    return TwoCAs(root[0].subject.rfc4514_string(), partner[0].subject.rfc4514_string(), d / "bundle.pem",
                  d / "crls.pem", (d / "partner-crm.crt", d / "partner-crm.key"), d / "inter-crm.crt",
                  d / "inter-chain.pem", d / "inter-crls.pem")


def tls(test_pki, **changes) -> dict:
    return {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
            "client_ca": str(test_pki.ca), "crl": str(test_pki.dir / "crl.pem"), **changes}


def pinned(policy: dict, issuer: str) -> dict:
    return {**policy, "match": {**policy["match"], "issuer": issuer}}


# -- serving: the same subject from the other CA is nobody ---------------------------------------------
async def test_a_pinned_client_is_not_the_same_subject_from_another_ca(tmp_path, test_pki, two, recorder_url,
                                                                       recorder):
    policies = {"crm": pinned(POLICIES["crm"], two.root_dn)}
    config = write_config(tmp_path, test_pki, recorder_url, policies,
                          tls=tls(test_pki, client_ca=str(two.bundle), crl=str(two.crls)))
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s, s.get(url + STATE) as resp:
            assert resp.status == 200
        # the handshake accepts it (the partner CA is trusted); no policy maps it
        async with session(test_pki, two.partner_crm) as s, s.get(url + STATE) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 403, body
    assert "matches no client policy" in body["detail"]
    assert recorder.forwarded() == [f"GET {STATE}"]


async def test_an_intermediate_named_like_the_pinned_ca_does_not_match(tmp_path, test_pki, two, recorder_url,
                                                                      recorder):
    """Another CA of the bundle signs an intermediate with the pinned CA's name, and a crm under it.

    OpenSSL accepts the chain (it ends at a trusted root), and the leaf's issuer field reads like
    the pin; the pin holds only for the CA of tls.client_ca whose signature is on the leaf.
    """
    root = pki.load_ca(test_pki.dir)
    fake = pki.make_ca("Partner CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY, issuer=root, path_length=0)
    assert fake[0].subject.rfc4514_string() == two.partner_dn
    leaf, key = pki.make_client_cert(*fake, "crm", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    (tmp_path / "fake-chain.pem").write_bytes(leaf.public_bytes(Encoding.PEM) + fake[0].public_bytes(Encoding.PEM))
    pki.write_pem(tmp_path / "fake.key", key)
    policies = {"crm": pinned(POLICIES["crm"], two.partner_dn)}
    config = write_config(tmp_path, test_pki, recorder_url, policies,
                          tls=tls(test_pki, client_ca=str(two.bundle), crl=None))
    async with gateway_running(config) as (url, _):
        async with session(test_pki, two.partner_crm) as s, s.get(url + STATE) as resp:
            assert resp.status == 200
        async with session(test_pki, (tmp_path / "fake-chain.pem", tmp_path / "fake.key")) as s, \
                s.get(url + STATE) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 403, body
    assert "matches no client policy" in body["detail"]
    assert recorder.forwarded() == [f"GET {STATE}"]
    proc = run("policy", "explain", "-c", str(config), "--cert", str(tmp_path / "fake-chain.pem"), "--method", "GET",
               "--path", STATE, cwd=tmp_path)
    assert proc.returncode == 1 and "client: none" in proc.stdout, proc


# -- a reload that brings in an overlapping policy fails and keeps the policies in force ------------------
async def test_a_reload_bringing_an_overlapping_policy_fails_and_keeps_the_old_policies(tmp_path, test_pki, two,
                                                                                        recorder_url):
    from gateway.runtime import lifecycle

    config = write_config(tmp_path, test_pki, recorder_url, {"crm": POLICIES["crm"]}, reload={"watch_s": 0})
    async with gateway_running(config) as (url, running):
        twin = {**POLICIES["crm"], "client": "crm-uri", "match": {"common_name": "crm",
                                                                  "san_uri": "spiffe://gateway.example/crm"}}
        (tmp_path / "policies" / "crm-uri.yaml").write_text(json.dumps(twin))
        assert lifecycle.reload(running) is False
        assert [p.client for p in running.gateway.policies.policies] == ["crm"]
        async with session(test_pki, test_pki.client("crm")) as s, s.get(url + STATE) as resp:
            assert resp.status == 200     # still crm: not refused as "more than one client policy"
        families = await scrape(running.config.admin)
        assert value(families, "gateway_config_reloads_total", result="error") == 1
        # pinning one of them is not enough: the other still takes any CA's certificate
        (tmp_path / "policies" / "crm-uri.yaml").write_text(json.dumps(pinned(twin, two.partner_dn)))
        assert lifecycle.reload(running) is False
        # each pinned to its own CA, they are told apart
        (tmp_path / "policies" / "crm.yaml").write_text(json.dumps(pinned(POLICIES["crm"], two.root_dn)))
        assert lifecycle.reload(running) is True
        assert sorted(p.client for p in running.gateway.policies.policies) == ["crm", "crm-uri"]
        families = await scrape(running.config.admin)
        assert value(families, "gateway_config_reloads_total", result="error") == 2


# -- gateway check --------------------------------------------------------------------------------------
def test_check_names_both_files_of_overlapping_policies(tmp_path, test_pki):
    twin = {**POLICIES["crm"], "client": "crm-uri", "match": {"subject": "CN=crm,O=gateway example"}}
    path = write_config(tmp_path, test_pki, UPSTREAM, {**POLICIES, "crm-uri": twin}).resolve()
    rc, out, err = check(path)
    folder = path.parent / "policies"
    line = line_with(err, f"{folder / 'crm.yaml'}", f"{folder / 'crm-uri.yaml'}")
    assert rc == 1 and "OK" not in out and ": match:" in line and not line.startswith("warning:")


def test_check_warns_about_policies_on_different_keys_one_certificate_could_match(tmp_path, test_pki):
    """crm matches common_name crm, crm-uri a SPIFFE ID: a certificate carrying both is both (and refused)."""
    twin = {**POLICIES["crm"], "client": "crm-uri", "match": {"san_uri": "spiffe://gateway.example/crm"}}
    path = write_config(tmp_path, test_pki, UPSTREAM, {"crm": POLICIES["crm"], "crm-uri": twin}).resolve()
    rc, out, err = check(path)
    folder = path.parent / "policies"
    assert (rc, out.strip()) == (0, "OK"), err
    assert "unknown_client" in line_with(err, "warning:", f"{folder / 'crm-uri.yaml'}", f"{folder / 'crm.yaml'}")
    other = {**twin, "match": {"san_uri": "spiffe://gateway.example/other"}}
    uris = {"crm-uri": twin, "other": {**other, "client": "other"}}
    (tmp_path / "uris").mkdir()
    rc, out, err = check(write_config(tmp_path / "uris", test_pki, UPSTREAM, uris).resolve())
    assert (rc, out.strip(), [line for line in err if ": match:" in line]) == (0, "OK", [])   # two SPIFFE IDs


def test_check_warns_about_each_policy_without_issuer_when_client_ca_holds_two_cas(tmp_path, test_pki, two):
    policies = {**POLICIES, "crm": pinned(POLICIES["crm"], two.root_dn)}
    path = write_config(tmp_path, test_pki, UPSTREAM, policies, tls=tls(test_pki)).resolve()
    rc, out, err = check(path)
    assert (rc, out.strip()) == (0, "OK") and not [line for line in err if "issuer" in line], err   # one CA
    path = write_config(tmp_path, test_pki, UPSTREAM, policies,
                        tls=tls(test_pki, client_ca=str(two.bundle), crl=str(two.crls))).resolve()
    rc, out, err = check(path)
    assert (rc, out.strip()) == (0, "OK"), err
    folder = path.parent / "policies"
    unpinned = [line for line in err if "no issuer" in line]
    assert sorted(unpinned) == sorted(line_with(err, "warning:", str(folder / f"{name}.yaml"), "no issuer")
                                      for name in ("hr-system", "lawyer"))
    assert two.partner_dn in unpinned[0] and two.root_dn in unpinned[0]    # the CAs it could be pinned to


def test_check_warns_about_an_issuer_that_is_no_ca_of_the_bundle(tmp_path, test_pki):
    policies = {"crm": pinned(POLICIES["crm"], "CN=Nobody CA")}
    path = write_config(tmp_path, test_pki, UPSTREAM, policies, tls=tls(test_pki)).resolve()
    rc, out, err = check(path)
    assert (rc, out.strip()) == (0, "OK"), err
    assert line_with(err, "warning:", "crm.yaml: match.issuer: CN=Nobody CA", "no CA of tls.client_ca")


# -- policy explain: the certificate is checked first, as serving checks it ------------------------------
REVOKED_ONE = {"client": "revoked-one", "match": {"common_name": "revoked-one"}, "allow": ["order_state"],
               "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}


def explain(config: Path, cert: Path, *extra: str, method: str = "GET", path: str = STATE):
    proc = run("policy", "explain", "-c", str(config), "--cert", str(cert), "--method", method, "--path", path,
               *extra, cwd=config.parent)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


@pytest.fixture(scope="module")
def explain_config(tmp_path_factory, test_pki) -> Path:
    return write_config(tmp_path_factory.mktemp("explain"), test_pki, UPSTREAM,
                        {**POLICIES, "revoked-one": REVOKED_ONE}).resolve()


@pytest.mark.parametrize("which, client, solicitor, code", [
    ("revoked-one", "revoked-one", EXTERNAL, "revoked"),
    ("wrong-ca", "hr-system", INTERNAL, "unknown_ca"),
    ("expired", "hr-system", INTERNAL, "expired"),
    ("not-yet-valid", "hr-system", INTERNAL, "not_yet_valid"),
    ("server-auth-only", "hr-system", INTERNAL, "bad_purpose"),
])
def test_explain_refuses_what_the_handshake_refuses(explain_config, test_pki, which, client, solicitor, code):
    """Each certificate maps to a policy that would allow the call: the certificate check is the decision."""
    cert = test_pki.client(which)[0] if which == "revoked-one" else test_pki.special(which)[0]
    rc, lines, err = explain(explain_config, cert, "--form", f"solicitor={solicitor}")
    assert rc == 1, (lines, err)
    assert line_with(lines, f"client: {client} (")
    assert lines[-1].startswith(f"decision: deny {code}: "), lines


def test_explain_takes_the_intermediates_after_the_leaf(tmp_path, test_pki, two):
    config = write_config(tmp_path, test_pki, UPSTREAM, {"crm": POLICIES["crm"]},
                          tls=tls(test_pki, crl=str(two.inter_crls))).resolve()
    rc, lines, _ = explain(config, two.inter_chain, "--form", f"solicitor={EXTERNAL}")
    assert rc == 0 and lines[-1].startswith("decision: allow"), lines
    rc, lines, _ = explain(config, two.inter_crm, "--form", f"solicitor={EXTERNAL}")
    assert rc == 1 and lines[-1].startswith("decision: deny unknown_ca: "), lines


def test_explain_refuses_a_certificate_whose_ca_has_no_crl(tmp_path, test_pki, two):
    config = write_config(tmp_path, test_pki, UPSTREAM, {"crm": POLICIES["crm"]},
                          tls=tls(test_pki, client_ca=str(two.bundle))).resolve()   # only the root's CRL
    rc, lines, _ = explain(config, two.partner_crm[0], "--form", f"solicitor={EXTERNAL}")
    assert rc == 1 and lines[-1].startswith("decision: deny crl_missing: "), lines
    rc, lines, _ = explain(config, test_pki.client("crm")[0], "--form", f"solicitor={EXTERNAL}")
    assert rc == 0, lines


def test_explain_refuses_every_certificate_while_the_crl_is_past_its_next_update(tmp_path, test_pki):
    ca_cert, ca_key = pki.load_ca(test_pki.dir)
    pki.write_pem(tmp_path / "stale.pem", pki.make_crl(ca_cert, ca_key, number=99, last_update=NOW - 10 * DAY,
                                                       next_update=NOW - DAY))
    config = write_config(tmp_path, test_pki, UPSTREAM, {"crm": POLICIES["crm"]},
                          tls=tls(test_pki, crl=str(tmp_path / "stale.pem"))).resolve()
    rc, lines, _ = explain(config, test_pki.client("crm")[0], "--form", f"solicitor={EXTERNAL}")
    assert rc == 1 and lines[-1].startswith("decision: deny crl_expired: "), lines


def test_explain_an_order_operation_without_the_order_solicitor_exits_3(explain_config, test_pki):
    rc, lines, _ = explain(explain_config, test_pki.client("crm")[0])
    assert rc == 3 and "EXTERNAL:*" in lines[-1] and line_with(lines, "order scope:"), lines
    rc, _, _ = explain(explain_config, test_pki.client("crm")[0], "--form", f"solicitor={INTERNAL}")
    assert rc == 1
    rc, _, _ = explain(explain_config, test_pki.client("crm")[0], method="POST", path="/orders")
    assert rc == 1   # create_order: the solicitor is in the request, and missing is a 400, not a condition


@pytest.mark.parametrize("args, named", [
    (["--method", "PO ST"], "--method"),
    (["--path", "orders/x"], "--path"),
    (["--path", "/orders /x"], "--path"),
    (["--config-without-client-ca"], "tls.client_ca"),
])
def test_explain_unusable_input_exits_2(tmp_path, test_pki, explain_config, args, named):
    config, cert, method, path = explain_config, test_pki.client("crm")[0], "GET", STATE
    if args == ["--config-without-client-ca"]:
        config = write_config(tmp_path, test_pki, UPSTREAM, tls=tls(test_pki, client_ca=str(tmp_path / "gone.crt")))
    elif args[0] == "--method":
        method = args[1]
    else:
        path = args[1]
    rc, lines, err = explain(config, cert, method=method, path=path)
    assert rc == 2 and not lines and named in err, (rc, lines, err)
