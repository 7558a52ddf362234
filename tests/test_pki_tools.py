"""Certificates from the PKI tools people already have, made with the real `openssl` command.

Profiles: a CA made as the openssl tutorial does it (`openssl req -x509`: no keyUsage), an
easy-rsa CA (basicConstraints not critical), a CA without key identifiers, and version 1
client certificates from `openssl x509 -req`. nginx accepts all of them, and so does the
gateway unless `tls.x509_strict` is true; then the handshake is refused with reason
`nonconforming` and a real TLS alert, and `gateway check` names the rule each CA breaks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from conftest import need_programs
from gateway.shell import oplog
from gateway.tools.check import check
from gateway_harness import build_pki, gateway_running, write_config
from test_gateway_metrics import scrape, value

need_programs("curl", "openssl")

# [extensions] sections as the tools write them; "none" drops what OpenSSL 3 would add by itself
PROFILES = {
    "openssl-tutorial": None,  # the openssl.cnf that comes with the system
    "easy-rsa": "basicConstraints = CA:TRUE\nsubjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid:always,issuer:always\nkeyUsage = cRLSign, keyCertSign\n",
    "no-key-identifiers": "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, cRLSign, keyCertSign\n"
                          "subjectKeyIdentifier = none\nauthorityKeyIdentifier = none\n",
}
RULES = {
    "openssl-tutorial": "CA without a keyUsage extension",
    "easy-rsa": "basicConstraints of a CA not marked critical",
    "no-key-identifiers": "CA without a subjectKeyIdentifier",
}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_profile(dir: Path, profile: str) -> Path:
    """DIR/ca.crt (the profile's CA), DIR/crm.crt+key (a v1 client from `openssl x509 -req`), DIR/crl.pem."""
    dir.mkdir(parents=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca = ["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", f"/CN={profile} CA"]
    if PROFILES[profile] is not None:
        (dir / "ca.cnf").write_text(f"[req]\ndistinguished_name = dn\nx509_extensions = ext\n[dn]\n"
                                    f"[ext]\n{PROFILES[profile]}")
        ca += ["-config", "ca.cnf"]
    openssl(*ca, cwd=dir)
    openssl("req", *key, "-keyout", "crm.key", "-out", "crm.csr", "-subj", "/CN=crm/O=integrator", cwd=dir)
    openssl("x509", "-req", "-in", "crm.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "crm.crt", "-days", "30", cwd=dir)
    # an empty CRL, as `openssl ca -gencrl` makes it
    (dir / "index.txt").write_text("")
    (dir / "crlnumber").write_text("01\n")
    (dir / "crl.cnf").write_text(f"[ca]\ndefault_ca = ca\n[ca]\ndatabase = {dir}/index.txt\n"
                                 f"crlnumber = {dir}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n")
    openssl("ca", "-config", "crl.cnf", "-gencrl", "-keyfile", "ca.key", "-cert", "ca.crt", "-out", "crl.pem",
            cwd=dir)
    return dir


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki-tools")
    return {name: make_profile(root / name, name) for name in PROFILES}


@pytest.fixture(scope="module")
def server_pki(tmp_path_factory):
    return build_pki(tmp_path_factory.mktemp("server-pki"))


def config_for(tmp_path: Path, server_pki, ca_dir: Path, strict: bool) -> Path:
    policy = {"client": "crm", "match": {"common_name": "crm"}, "allow": ["order_state"],
              "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}
    tls = {"cert": str(server_pki.dir / "server.crt"), "key": str(server_pki.dir / "server.key"),
           "client_ca": str(ca_dir / "ca.crt"), "crl": str(ca_dir / "crl.pem"), "x509_strict": strict}
    return write_config(tmp_path, server_pki, "http://127.0.0.1:9", policies={"crm": policy}, tls=tls)


async def curl(server_pki, ca_dir: Path, url: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(server_pki.ca),
        "--cert", str(ca_dir / "crm.crt"), "--key", str(ca_dir / "crm.key"), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return int(out or b"0"), err.decode()


@pytest.mark.parametrize("profile", list(PROFILES))
async def test_ordinary_cas_are_accepted_by_default(tmp_path, server_pki, profiles, profile):
    async with gateway_running(config_for(tmp_path, server_pki, profiles[profile], strict=False)) as (url, _):
        status, err = await curl(server_pki, profiles[profile], url + "/nope")
    assert status == 404, err  # through the handshake, mapped to crm, and no such operation


@pytest.mark.parametrize("profile", list(PROFILES))
async def test_strict_mode_refuses_them_with_a_reason_and_an_alert(tmp_path, server_pki, profiles, profile, capsys):
    async with gateway_running(config_for(tmp_path, server_pki, profiles[profile], strict=True)) as (url, running):
        status, err = await curl(server_pki, profiles[profile], url + "/nope")
        families = await scrape(running.config.admin)
    assert status == 0 and "alert" in err, err  # told why, not "connection reset"
    assert value(families, "gateway_tls_handshake_failures_total", reason="nonconforming") == 1
    oplog.drain()
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"handshake_failure"' in line]
    assert len(logged) == 1 and logged[0]["reason"] == "nonconforming"
    assert logged[0]["subject"] == "O=integrator,CN=crm" and logged[0]["issuer"] == f"CN={profile} CA"
    assert logged[0]["serial"] and logged[0]["verify_message"]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_check_names_the_rule_each_ca_breaks(tmp_path, server_pki, profiles, profile):
    problems, warnings = check(str(config_for(tmp_path, server_pki, profiles[profile], strict=False)))
    assert problems == [] and any(RULES[profile] in w and "accepted" in w for w in warnings), warnings
    problems, _ = check(str(config_for(tmp_path, server_pki, profiles[profile], strict=True)))
    assert any(RULES[profile] in p and "refuses its clients" in p for p in problems), problems


def test_check_finds_a_leftover_crl_and_a_ca_without_one(tmp_path, server_pki, profiles):
    ca_dir = profiles["openssl-tutorial"]
    other = profiles["easy-rsa"]
    config = config_for(tmp_path, server_pki, ca_dir, strict=False)
    data = json.loads(config.read_text())
    data["tls"]["crl"] = str(other / "crl.pem")  # the CRL of a CA that is no longer trusted
    config.write_text(json.dumps(data))
    problems, _ = check(str(config))
    assert any("the CRL of CN=easy-rsa CA was issued by no CA in tls.client_ca" in p for p in problems), problems
    assert any("no CRL of CN=openssl-tutorial CA: every client it issued would be refused" in p for p in problems)


def test_check_warns_of_a_crl_due_soon(tmp_path, server_pki):
    """Relative to the CRL's period: less than a quarter of it left, or 14 days, whichever comes later."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    stamp = "%Y%m%d%H%M%SZ"
    ca_dir = make_profile(tmp_path / "soon", "easy-rsa")
    # a CRL published for 30 days, 3 left: warned of
    openssl("ca", "-config", "crl.cnf", "-gencrl", "-crl_lastupdate", (now - dt.timedelta(days=27)).strftime(stamp),
            "-crl_nextupdate", (now + dt.timedelta(days=3)).strftime(stamp), "-keyfile", "ca.key", "-cert", "ca.crt",
            "-out", "crl.pem", cwd=ca_dir)
    _, warnings = check(str(config_for(tmp_path, server_pki, ca_dir, strict=False)))
    assert any("the CRL of CN=easy-rsa CA is due for renewal" in w for w in warnings), warnings
    assert not any("expires" in w and "easy-rsa" in w for w in warnings)  # the CA has 30 days left
    # a CRL published for 3 days, just now (a short-lived CRL, as a weekly one is): 3 days left is not "soon"
    openssl("ca", "-config", "crl.cnf", "-gencrl", "-crldays", "3", "-keyfile", "ca.key", "-cert", "ca.crt",
            "-out", "crl.pem", cwd=ca_dir)
    _, warnings = check(str(config_for(tmp_path, server_pki, ca_dir, strict=False)))
    assert not any("is due for renewal" in w for w in warnings), warnings


def test_check_says_an_expired_client_ca_is_a_problem(tmp_path, server_pki):
    import datetime as dt

    from gateway.tools import pki

    now = dt.datetime.now(dt.timezone.utc)
    ca = pki.make_ca("lapsed CA", not_before=now - dt.timedelta(days=40), not_after=now - dt.timedelta(days=1))
    (tmp_path / "lapsed").mkdir()
    pki.write_pem(tmp_path / "lapsed" / "ca.crt", ca[0])
    pki.write_pem(tmp_path / "lapsed" / "crl.pem", pki.make_crl(*ca, number=1, last_update=now - dt.timedelta(days=2),
                                                                   next_update=now + dt.timedelta(days=30)))
    problems, _ = check(str(config_for(tmp_path, server_pki, tmp_path / "lapsed", strict=False)))
    assert any("tls.client_ca: CN=lapsed CA,O=gateway example expired on" in p for p in problems), problems
