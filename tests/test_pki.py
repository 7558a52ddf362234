"""The development PKI (`gateway certs init/issue/revoke`), checked with cryptography and with a real TLS handshake."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.tools import certs, pki

UTC = dt.timezone.utc


@pytest.fixture
def pkidir(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    certs.init(d, ["hr-system", "crm"])
    return d


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl(d: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((d / "crl.pem").read_bytes())


def crl_number(c: x509.CertificateRevocationList) -> int:
    return c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def ext(c, cls):
    return c.extensions.get_extension_for_class(cls)


# --- init: files and their contents -------------------------------------------------------------


def test_init_writes_every_file_with_private_keys_0600(pkidir: Path):
    for name in ("ca", "server", "clients/hr-system", "clients/crm"):
        assert cert(pkidir / f"{name}.crt")
        key_path = pkidir / f"{name}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600, key_path
        assert stat.S_IMODE((pkidir / f"{name}.crt").stat().st_mode) == 0o644
        text = key_path.read_bytes()
        assert text.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
        key = serialization.load_pem_private_key(text, password=None)
        assert key.public_key() == cert(pkidir / f"{name}.crt").public_key()
    readme = (pkidir / "README.md").read_text()
    assert "local testing only" in readme and "production" in readme
    assert "gateway certs init certs --client hr-system --client crm" in readme
    assert not list(pkidir.rglob("*.tmp"))


def test_ca_is_a_self_signed_ca(pkidir: Path):
    ca = cert(pkidir / "ca.crt")
    assert ca.subject.rfc4514_string() == "CN=gateway example CA,O=gateway example"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(ca, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(ca, x509.SubjectKeyIdentifier).value.digest == \
        x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest


def test_validity_is_backdated_an_hour_and_lasts_3700_days(pkidir: Path):
    now = dt.datetime.now(UTC)
    for name in ("ca", "server", "clients/crm"):
        c = cert(pkidir / f"{name}.crt")
        assert now - dt.timedelta(minutes=61) < c.not_valid_before_utc < now - dt.timedelta(minutes=59)
        assert abs(c.not_valid_after_utc - (now + dt.timedelta(days=3700))) < dt.timedelta(minutes=1)
    assert cert(pkidir / "ca.crt").not_valid_after_utc.year >= 2036


def test_server_cert_verifies_against_the_ca_and_has_the_sans(pkidir: Path):
    ca, server = cert(pkidir / "ca.crt"), cert(pkidir / "server.crt")
    server.verify_directly_issued_by(ca)
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = ext(server, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert ext(server, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca, x509.SubjectKeyIdentifier).value.digest


def test_client_cert_subject_eku_and_spiffe_uri(pkidir: Path):
    ca, client = cert(pkidir / "ca.crt"), cert(pkidir / "clients/hr-system.crt")
    client.verify_directly_issued_by(ca)
    assert client.subject.rfc4514_string() == "CN=hr-system,O=gateway example"
    assert list(ext(client, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext(client, x509.KeyUsage).critical
    assert ext(client, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == \
        ["spiffe://gateway.example/hr-system"]
    assert ext(client, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert client.serial_number != cert(pkidir / "clients/crm.crt").serial_number


def test_crl_is_empty_and_signed_by_the_ca(pkidir: Path):
    ca, c = cert(pkidir / "ca.crt"), crl(pkidir)
    assert c.is_signature_valid(ca.public_key())
    assert c.issuer == ca.subject
    assert len(c) == 0
    assert crl_number(c) == 1
    now = dt.datetime.now(UTC)
    assert c.last_update_utc <= now
    assert abs(c.next_update_utc - (now + dt.timedelta(days=3700))) < dt.timedelta(minutes=1)
    assert ext(c, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca, x509.SubjectKeyIdentifier).value.digest


def test_the_ssl_module_loads_the_pki(pkidir: Path):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pkidir / "ca.crt"))
    ctx.load_cert_chain(pkidir / "server.crt", pkidir / "server.key")
    ctx.load_verify_locations(cafile=str(pkidir / "crl.pem"))
    assert ctx.cert_store_stats()["crl"] == 1 and ctx.cert_store_stats()["x509_ca"] == 1


# --- init: refusals ---------------------------------------------------------------------------


def test_init_refuses_to_overwrite(pkidir: Path):
    before = (pkidir / "ca.key").read_bytes()
    with pytest.raises(pki.PKIError, match="ca.key already exists"):
        certs.init(pkidir, ["other"])
    assert (pkidir / "ca.key").read_bytes() == before
    assert not (pkidir / "clients/other.crt").exists()


@pytest.mark.parametrize("name", ["", "-crm", "a b", "../evil", "crm/x", "x" * 65, "é"])
def test_bad_client_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(pki.PKIError, match="bad client name") as info:
        certs.init(tmp_path / "d", ["ok", name])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()  # nothing written


def test_longest_allowed_name_is_accepted(tmp_path: Path):
    certs.init(tmp_path / "d", ["A" + "b._-9" * 12 + "xyz"])  # 64 characters
    assert len(list((tmp_path / "d/clients").glob("*.crt"))) == 1


def test_duplicate_client_and_bad_days_are_refused(tmp_path: Path):
    with pytest.raises(pki.PKIError, match="more than once"):
        certs.init(tmp_path / "d", ["crm", "crm"])
    with pytest.raises(pki.PKIError, match="days"):
        certs.init(tmp_path / "d", ["crm"], days=0)
    assert not (tmp_path / "d").exists()


# --- issue ----------------------------------------------------------------------------------


def test_issue_adds_a_client_and_refuses_duplicates(pkidir: Path):
    path = certs.issue(pkidir, "billing", days=30)
    assert path == pkidir / "clients/billing.crt"
    c = cert(path)
    c.verify_directly_issued_by(cert(pkidir / "ca.crt"))
    assert c.subject.rfc4514_string() == "CN=billing,O=gateway example"
    assert list(ext(c, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert abs(c.not_valid_after_utc - (dt.datetime.now(UTC) + dt.timedelta(days=30))) < dt.timedelta(minutes=1)
    assert stat.S_IMODE((pkidir / "clients/billing.key").stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(pki.PKIError, match="already exists"):
        certs.issue(pkidir, "billing")
    with pytest.raises(pki.PKIError, match="already exists"):
        certs.issue(pkidir, "crm")
    assert path.read_bytes() == before


def test_issue_never_outlives_the_ca(pkidir: Path):
    c = cert(certs.issue(pkidir, "forever", days=100000))
    assert c.not_valid_after_utc == cert(pkidir / "ca.crt").not_valid_after_utc


def test_issue_without_a_ca_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(pki.PKIError, match="ca.crt: no such file") as info:
        certs.issue(tmp_path, "crm")
    assert "\n" not in str(info.value)


# --- revoke ---------------------------------------------------------------------------------


def test_revoke_lists_the_serial_and_keeps_earlier_entries(pkidir: Path):
    ca = cert(pkidir / "ca.crt")
    crm = cert(pkidir / "clients/crm.crt")
    next_before = crl(pkidir).next_update_utc

    assert certs.revoke(pkidir, "crm") == crm.serial_number
    c = crl(pkidir)
    assert c.is_signature_valid(ca.public_key())
    assert [r.serial_number for r in c] == [crm.serial_number]
    assert crl_number(c) == 2
    assert c.next_update_utc >= next_before
    first_date = c.get_revoked_certificate_by_serial_number(crm.serial_number).revocation_date_utc

    hr = cert(pkidir / "clients/hr-system.crt")
    assert certs.revoke(pkidir, "hr-system") == hr.serial_number
    c = crl(pkidir)
    assert c.is_signature_valid(ca.public_key())
    assert {r.serial_number for r in c} == {crm.serial_number, hr.serial_number}
    assert c.get_revoked_certificate_by_serial_number(crm.serial_number).revocation_date_utc == first_date
    assert crl_number(c) == 3
    assert not list(pkidir.glob(".crl.pem*"))  # no temp file left behind


def test_revoking_twice_changes_nothing(pkidir: Path):
    certs.revoke(pkidir, "crm")
    before = (pkidir / "crl.pem").read_bytes()
    assert certs.revoke(pkidir, "crm") == cert(pkidir / "clients/crm.crt").serial_number
    assert (pkidir / "crl.pem").read_bytes() == before


def test_revoke_refuses_unknown_clients_and_foreign_certs(pkidir: Path, tmp_path: Path):
    with pytest.raises(pki.PKIError, match="nobody.crt: no such file"):
        certs.revoke(pkidir, "nobody")
    with pytest.raises(pki.PKIError, match="bad client name"):
        certs.revoke(pkidir, "../ca")
    other = tmp_path / "other"
    certs.init(other, ["crm"])
    (pkidir / "clients/crm.crt").write_bytes((other / "clients/crm.crt").read_bytes())
    with pytest.raises(pki.PKIError, match="not issued by"):
        certs.revoke(pkidir, "crm")
    assert len(crl(pkidir)) == 0


def test_load_ca_detects_a_mismatched_key(pkidir: Path, tmp_path: Path):
    cert_, key = pki.load_ca(pkidir)
    assert cert_.subject.rfc4514_string() == "CN=gateway example CA,O=gateway example"
    assert key.public_key() == cert_.public_key()
    pki.write_pem(pkidir / "ca.key", pki.new_key())
    with pytest.raises(pki.PKIError, match="does not match"):
        pki.load_ca(pkidir)


# --- a real TLS handshake -------------------------------------------------------------------


def server_context(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(d / "ca.crt"))
    ctx.load_verify_locations(cafile=str(d / "crl.pem"))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(d: Path, crt: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(crt, key)
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[object, object]:
    """One exchange over a socketpair: (server result, client result), each a str or an exception.

    The server answers with the peer's subject; with TLS 1.3 a refused client
    certificate shows on the client's first read, so the client reads once.
    """
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                peer = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
                assert s.recv(4) == b"ping"
                s.sendall(peer.subject.rfc4514_string().encode())
                result["server"] = "ok"
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["server"] = exc
            a.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as c:
            c.sendall(b"ping")
            got = c.recv(200)
            client: object = got.decode() if got else EOFError("connection closed")
    except Exception as exc:  # noqa: BLE001
        client = exc
    t.join(10)
    assert not t.is_alive()
    return result["server"], client


def test_handshake_succeeds_before_revoke_and_fails_after(pkidir: Path):
    crm = client_context(pkidir, pkidir / "clients/crm.crt", pkidir / "clients/crm.key")
    server, client = handshake(server_context(pkidir), crm)
    assert server == "ok"
    assert client == "CN=crm,O=gateway example"

    certs.revoke(pkidir, "crm")
    server, client = handshake(server_context(pkidir), crm)
    assert isinstance(server, ssl.SSLError) and "revoked" in str(server), server
    assert isinstance(client, (ssl.SSLError, EOFError, ConnectionError)), client

    # The other client is unaffected by crm's revocation.
    hr = client_context(pkidir, pkidir / "clients/hr-system.crt", pkidir / "clients/hr-system.key")
    assert handshake(server_context(pkidir), hr) == ("ok", "CN=hr-system,O=gateway example")


def test_handshake_refuses_certs_made_by_the_test_helpers(pkidir: Path, tmp_path: Path):
    """make_client_cert: an expired cert and a serverAuth-only cert are refused; no EKU is accepted."""
    ca_cert, ca_key = pki.load_ca(pkidir)
    now = dt.datetime.now(UTC)

    def try_cert(name: str, **kw) -> object:
        c, k = pki.make_client_cert(ca_cert, ca_key, name, **kw)
        pki.write_pem(tmp_path / f"{name}.crt", c)
        pki.write_pem(tmp_path / f"{name}.key", k)
        return handshake(server_context(pkidir),
                         client_context(pkidir, tmp_path / f"{name}.crt", tmp_path / f"{name}.key"))[0]

    valid = dict(not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(days=1))
    assert try_cert("no-eku", eku=None, **valid) == "ok"
    assert "expired" in str(try_cert("old", not_before=now - dt.timedelta(days=2),
                                     not_after=now - dt.timedelta(days=1)))
    assert "unsuitable certificate purpose" in str(try_cert("server-only", eku=("serverAuth",), **valid))

    other_ca, other_key = pki.make_ca("another CA", **valid)
    c, k = pki.make_client_cert(other_ca, other_key, "stranger", **valid)
    pki.write_pem(tmp_path / "stranger.crt", c)
    pki.write_pem(tmp_path / "stranger.key", k)
    server, _ = handshake(server_context(pkidir),
                          client_context(pkidir, tmp_path / "stranger.crt", tmp_path / "stranger.key"))
    assert "unable to get local issuer certificate" in str(server)


# --- the command line -----------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gateway")
    certs.add_parser(parser.add_subparsers(dest="command", required=True))
    return certs.cli_main(parser.parse_args(["certs", *argv]))


def test_cli_init_issue_revoke(tmp_path: Path, capsys):
    d = tmp_path / "pki"
    assert run_cli("init", str(d), "--client", "hr-system", "--client", "crm", "--days", "40") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(d) in out and "hr-system, crm" in out
    assert (cert(d / "ca.crt").not_valid_after_utc - dt.datetime.now(UTC)).days == 39
    assert "--days 40" in (d / "README.md").read_text()

    assert run_cli("issue", str(d), "billing") == 0
    assert capsys.readouterr().out.strip() == f"wrote {d}/clients/billing.crt and {d}/clients/billing.key"

    assert run_cli("revoke", str(d), "crm") == 0
    serial = cert(d / "clients/crm.crt").serial_number
    assert capsys.readouterr().out.strip() == f"revoked crm (serial {serial:#x}); wrote {d}/crl.pem"
    assert run_cli("revoke", str(d), "crm") == 0
    assert "already revoked" in capsys.readouterr().out


def test_cli_errors_are_one_line_on_stderr(tmp_path: Path, capsys):
    d = tmp_path / "pki"
    assert run_cli("init", str(d), "--client", "crm") == 0
    capsys.readouterr()
    for argv, message in [
        (("init", str(d)), "already exists"),
        (("issue", str(d), "crm"), "already exists"),
        (("issue", str(d), "bad name"), "bad client name"),
        (("revoke", str(d), "nobody"), "no such file"),
        (("issue", str(tmp_path / "missing"), "crm"), "no such file"),
    ]:
        assert run_cli(*argv) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("gateway: ") and message in captured.err
        assert captured.err.count("\n") == 1, captured.err


@pytest.mark.parametrize("sub", ["init", "issue", "revoke"])
def test_cli_help(sub: str, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(sub, "--help")
    assert info.value.code == 0
    assert "DIR" in capsys.readouterr().out
