"""Onboarding and rotation as an operator does them: an integrator's own key signed from its request,
a client re-issued after a revoke, a server certificate rotated file by file while the gateway runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import gateway_command, need_programs
from gateway.runtime import lifecycle
from gateway.tools import certs, pki
from gateway_harness import NOW, DAY, ORDER_CRM, gateway_running, write_config
from test_gateway_metrics import scrape, value

need_programs("curl", "openssl")

PARTNER = {"client": "partner", "match": {"subject": "CN=partner,O=gateway example"}, "allow": ["order_state"],
           "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}


def gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(gateway_command(*args), cwd=cwd, capture_output=True, text=True, timeout=60)


def integrator_request(folder: Path, subject: str = "/CN=evil/O=elsewhere", *extra: str) -> tuple[Path, Path]:
    """The integrator's side, with the real openssl: a key that never leaves it and a request for it."""
    folder.mkdir(parents=True, exist_ok=True)
    key, csr = folder / "partner.key", folder / "partner.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", subject, *extra],
                   check=True, capture_output=True)
    return key, csr


def curl_status(url: str, ca: Path, cert: Path, key: Path) -> str:
    proc = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca),
                           "--cert", str(cert), "--key", str(key), url], capture_output=True, text=True, timeout=30)
    return proc.stdout


async def test_sign_certifies_the_integrators_own_key_as_the_ca_decides(tmp_path, test_pki, recorder_url):
    ca_dir = tmp_path / "ca"
    certs.init(ca_dir, [])
    key, csr = integrator_request(tmp_path / "integrator", "/CN=evil/O=elsewhere",
                                  "-addext", "basicConstraints=critical,CA:TRUE",
                                  "-addext", "subjectAltName=DNS:bank.example")
    proc = gateway("certs", "sign", str(ca_dir), str(csr), "partner", "--days", "30", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "CN=partner,O=gateway example" in proc.stdout and "CN=evil" in proc.stdout   # says what it did not copy

    cert = x509.load_pem_x509_certificate((ca_dir / "clients" / "partner.crt").read_bytes())
    assert not (ca_dir / "clients" / "partner.key").exists()       # the private key stayed with the integrator
    assert cert.subject.rfc4514_string() == "CN=partner,O=gateway example"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://gateway.example/partner"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    own = serialization.load_pem_private_key(key.read_bytes(), None).public_key()
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*der) == own.public_bytes(*der)
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31

    # The integrator calls the gateway with its own key and the signed certificate.
    config = write_config(tmp_path, test_pki, recorder_url, policies={"partner": PARTNER},
                          tls={"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
                               "client_ca": str(ca_dir / "ca.crt"), "crl": str(ca_dir / "crl.pem")})
    async with gateway_running(config) as (url, _):
        status = await asyncio.to_thread(curl_status, f"{url}/orders/{ORDER_CRM}/state", test_pki.ca,
                                         ca_dir / "clients" / "partner.crt", key)
    assert status == "200"


@pytest.mark.parametrize("make, message", [
    ("tampered", "signature does not verify"),
    ("rsa1024", "too weak"),
    ("p192", "the curve"),
    ("garbage", "not a certificate request"),
])
def test_sign_refuses_requests_it_cannot_trust(tmp_path, make, message):
    ca_dir = tmp_path / "ca"
    certs.init(ca_dir, [])
    csr = tmp_path / "request.csr"
    if make == "tampered":
        _, good = integrator_request(tmp_path / "i")
        request = x509.load_pem_x509_csr(good.read_bytes())
        der = bytearray(request.public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0x01  # inside the signature
        csr.write_bytes(bytes(der))
    elif make == "rsa1024":
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout", str(tmp_path / "k"),
                        "-out", str(csr), "-subj", "/CN=weak"], check=True, capture_output=True)
    elif make == "p192":
        request = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "weak")]))
        csr.write_bytes(request.sign(ec.generate_private_key(ec.SECP192R1()), hashes.SHA256())
                        .public_bytes(serialization.Encoding.PEM))
    else:
        csr.write_text("not a request\n")
    proc = gateway("certs", "sign", str(ca_dir), str(csr), "partner", cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (ca_dir / "clients" / "partner.crt").exists()


def test_sign_refuses_a_name_in_use_unless_forced(tmp_path):
    ca_dir = tmp_path / "ca"
    certs.init(ca_dir, ["partner"])
    _, csr = integrator_request(tmp_path / "i")
    proc = gateway("certs", "sign", str(ca_dir), str(csr), "partner", cwd=tmp_path)
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--force" in proc.stderr
    earlier = x509.load_pem_x509_certificate((ca_dir / "clients" / "partner.crt").read_bytes())
    proc = gateway("certs", "sign", str(ca_dir), str(csr), "partner", "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "is not revoked" in proc.stdout        # the earlier certificate still works: the operator is told how
    assert not (ca_dir / "clients" / "partner.key").exists()   # the earlier key was moved aside with its cert
    assert len(list((ca_dir / "clients").glob("partner.key.*"))) == 1
    command = proc.stdout.split("if it must stop working: ", 1)[1].split()
    assert command[:3] == ["gateway", "certs", "revoke"] and command[-2:] == ["--serial", f"{earlier.serial_number:x}"]
    assert gateway(*command[1:], cwd=tmp_path).returncode == 0
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(earlier.serial_number) is not None
    current = x509.load_pem_x509_certificate((ca_dir / "clients" / "partner.crt").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(current.serial_number) is None
    wrong = gateway("certs", "revoke", str(ca_dir), "partner", "--serial", "abc", cwd=tmp_path)
    assert wrong.returncode == 1 and "no certificate of partner with serial 0xabc" in wrong.stderr


async def test_a_client_is_issued_again_after_a_revoke(tmp_path, test_pki, recorder_url):
    ca_dir = tmp_path / "ca"
    certs.init(ca_dir, ["crm"])
    old = x509.load_pem_x509_certificate((ca_dir / "clients" / "crm.crt").read_bytes())
    assert gateway("certs", "revoke", str(ca_dir), "crm", cwd=tmp_path).returncode == 0
    refused = gateway("certs", "issue", str(ca_dir), "crm", cwd=tmp_path)
    assert refused.returncode == 1 and "--force" in refused.stderr
    again = gateway("certs", "issue", str(ca_dir), "crm", "--force", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr == "" and "not revoked" not in again.stdout, again.stderr
    serial = format(old.serial_number, "x")
    aside = ca_dir / "clients" / f"crm.crt.{serial}"
    assert aside.read_bytes() == old.public_bytes(serialization.Encoding.PEM)
    assert (ca_dir / "clients" / f"crm.key.{serial}").stat().st_mode & 0o077 == 0

    config = write_config(tmp_path, test_pki, recorder_url,
                          policies={"crm": {"client": "crm", "match": {"common_name": "crm"}, "allow": ["order_state"],
                                            "solicitors": [{"source": "EXTERNAL", "identifier": "*"}]}},
                          tls={"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
                               "client_ca": str(ca_dir / "ca.crt"), "crl": str(ca_dir / "crl.pem")})
    url_path = f"/orders/{ORDER_CRM}/state"
    async with gateway_running(config) as (url, _):
        new = await asyncio.to_thread(curl_status, url + url_path, test_pki.ca, ca_dir / "clients" / "crm.crt",
                                      ca_dir / "clients" / "crm.key")
        revoked = await asyncio.to_thread(curl_status, url + url_path, test_pki.ca, aside,
                                          ca_dir / "clients" / f"crm.key.{serial}")
    assert (new, revoked) == ("200", "000")   # the revoked one fails its handshake


# -- rotating the server's key and certificate, one file at a time ------------------------------------------

async def wait_for(predicate, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def rotating(tmp_path, test_pki, recorder_url):
    """A gateway whose server certificate and key are files of their own, watched every second."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(test_pki.dir / "server.crt", cert)
    shutil.copy(test_pki.dir / "server.key", key)
    ca_cert, ca_key = pki.load_ca(test_pki.dir)
    new_cert, new_key = pki.make_server_cert(ca_cert, ca_key, not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    config = write_config(tmp_path, test_pki, recorder_url, reload={"watch_s": 1},
                          tls={"cert": str(cert), "key": str(key), "client_ca": str(test_pki.ca),
                               "crl": str(test_pki.dir / "crl.pem")})
    return config, cert, key, new_cert, new_key


def served_serial(running, client: tuple[Path, Path]) -> int:
    """The serial of the certificate the front door presents to a new connection."""
    context = ssl.create_default_context(cafile=str(running.config.tls.client_ca))
    context.load_cert_chain(*map(str, client))
    with socket.create_connection(("127.0.0.1", running.config.listen.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


async def reloads(running, result: str) -> float:
    return value(await scrape(running.config.admin), "gateway_config_reloads_total", result=result)


async def test_a_rotation_done_file_by_file_reloads_once_without_a_failure(rotating, test_pki):
    config, cert, key, new_cert, new_key = rotating
    async with gateway_running(config) as (_, running):
        pki.write_pem(cert, new_cert)                   # the certificate first: it does not fit the key yet
        await wait_for(lambda: running.waiting_for_files)
        pki.write_pem(key, new_key)                     # within the next watch period, the key
        await wait_for(lambda: not running.waiting_for_files)
        assert (await reloads(running, "ok"), await reloads(running, "error")) == (1, 0)
        assert await asyncio.to_thread(served_serial, running, test_pki.client("crm")) == new_cert.serial_number   # the new pair serves


async def test_a_key_that_never_comes_is_a_failed_reload_one_period_later(rotating):
    config, cert, key, new_cert, _ = rotating
    async with gateway_running(config) as (_, running):
        old_context = running.contexts.context
        pki.write_pem(cert, new_cert)
        await wait_for(lambda: running.waiting_for_files)
        assert await reloads(running, "error") == 0
        await wait_for(lambda: not running.waiting_for_files, deadline_s=5)
        assert (await reloads(running, "ok"), await reloads(running, "error")) == (0, 1)
        assert running.contexts.context is old_context   # the running pair stays in force


async def test_a_crl_caught_half_written_is_not_a_failure(rotating, test_pki, tmp_path):
    config, *_ = rotating
    crl = tmp_path / "crl.pem"
    shutil.copy(test_pki.dir / "crl.pem", crl)
    settings = json.loads(config.read_text())
    settings["tls"]["crl"] = str(crl)
    config.write_text(json.dumps(settings))
    async with gateway_running(config) as (_, running):
        whole = crl.read_bytes()
        crl.write_bytes(whole[: len(whole) // 2])          # as `cp` leaves it for a moment
        await wait_for(lambda: running.waiting_for_files)
        crl.write_bytes(whole)
        await wait_for(lambda: not running.waiting_for_files)
        assert await reloads(running, "error") == 0


async def test_sighup_during_the_wait_ends_it_without_a_second_reload(rotating):
    config, cert, key, new_cert, new_key = rotating
    async with gateway_running(config) as (_, running):
        pki.write_pem(cert, new_cert)
        await wait_for(lambda: running.waiting_for_files)
        pki.write_pem(key, new_key)
        assert lifecycle.reload(running) is True          # SIGHUP, before the watcher's next period
        assert not running.waiting_for_files
        await asyncio.sleep(1.5)                           # the next period finds nothing new
        assert (await reloads(running, "ok"), await reloads(running, "error")) == (1, 0)


async def test_the_watch_outlives_an_unexpected_error(rotating, monkeypatch):
    config, cert, key, new_cert, new_key = rotating
    async with gateway_running(config) as (_, running):
        def broken(_):
            raise RuntimeError("something nobody expected")

        monkeypatch.setattr(lifecycle, "build_snapshot", broken)
        pki.write_pem(cert, new_cert)
        pki.write_pem(key, new_key)
        await asyncio.sleep(1.5)
        monkeypatch.undo()
        settings = json.loads(config.read_text())
        settings["limits"]["request_timeout_s"] = 11
        config.write_text(json.dumps(settings))             # the next change is picked up all the same
        await wait_for(lambda: running.config.limits.request_timeout_s == 11)


async def test_sighup_does_not_wait(rotating):
    config, cert, _, new_cert, _ = rotating
    async with gateway_running(config) as (_, running):
        pki.write_pem(cert, new_cert)
        assert lifecycle.reload(running) is False
        assert await reloads(running, "error") == 1


def test_certs_help_lists_sign(tmp_path):
    proc = gateway("certs", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "sign" in proc.stdout
    proc = gateway("certs", "sign", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and all(w in proc.stdout for w in ("DIR", "CSR", "NAME", "--days", "--force"))
