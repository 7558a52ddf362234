"""gateway/core/ocsp.py: OCSP requests, the AIA/CDP addresses, and judging responses (RFC 6960).

Good, revoked and unknown come from a real `openssl ocsp` responder (tests/ocsp_responder.py);
the responses that must never count as "good" (a stranger's signature, a CA or responder without
the OCSP-signing purpose, another certificate's status, stale, unsuccessful, garbage) are built
with cryptography's OCSPResponseBuilder. Also `gateway certs init|issue --ocsp-url --crl-url`.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509 import ocsp as xocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from conftest import gateway_command, need_programs
from gateway.core.ocsp import Answer, check_response, crl_urls, request_der, responder_urls
from gateway.tools import pki
from ocsp_responder import OcspResponder

need_programs("openssl")

UTC = dt.timezone.utc
NOW = pki._now()
NB, NA = NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=30)


def now() -> float:
    return time.time()


@pytest.fixture
def ocsp_responder(tmp_path):
    with OcspResponder.with_new_ca(tmp_path / "ocsp") as responder:
        yield responder


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca("OCSP unit CA", not_before=NB, not_after=NA)


@pytest.fixture(scope="module")
def other_ca():
    return pki.make_ca("another CA", not_before=NB, not_after=NA)


@pytest.fixture(scope="module")
def leaf(ca):
    return pki.make_client_cert(*ca, "crm", not_before=NB, not_after=NA, ocsp_url="http://127.0.0.1:1/",
                                crl_url="http://127.0.0.1:1/ca.crl")[0]


def response(cert, issuer, signer_cert, signer_key, *, status=xocsp.OCSPCertStatus.GOOD, this_update=None,
             next_update="default", certs=(), encoding=xocsp.OCSPResponderEncoding.NAME, algorithm=hashes.SHA1(),
             revoked_at=None, sign_hash="default") -> bytes:
    """A DER response built by cryptography: what an honest or a lying responder could send."""
    this_update = this_update or NOW - dt.timedelta(minutes=1)
    if next_update == "default":
        next_update = NOW + dt.timedelta(hours=1)
    if sign_hash == "default":
        sign_hash = None if isinstance(signer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    b = (xocsp.OCSPResponseBuilder()
         .add_response(cert=cert, issuer=issuer, algorithm=algorithm, cert_status=status, this_update=this_update,
                       next_update=next_update, revocation_time=revoked_at,
                       revocation_reason=x509.ReasonFlags.key_compromise if revoked_at else None)
         .responder_id(encoding, signer_cert))
    if certs:
        b = b.certificates(list(certs))
    return b.sign(signer_key, sign_hash).public_bytes(serialization.Encoding.DER)


def assert_error(answer: Answer, *words: str) -> None:
    assert answer.status == "error", answer
    for word in words:
        assert word in answer.reason, answer


# ---------------------------------------------------------------------------
# Requests and addresses


def test_request_is_der_with_a_sha1_certid_for_the_certificate(ca, leaf):
    req = xocsp.load_der_ocsp_request(request_der(leaf, ca[0]))
    assert req.serial_number == leaf.serial_number
    assert isinstance(req.hash_algorithm, hashes.SHA1)
    assert req.issuer_key_hash == x509.SubjectKeyIdentifier.from_public_key(ca[0].public_key()).digest


def test_urls_from_certificates_made_with_the_new_options(ca, leaf):
    assert responder_urls(leaf) == ["http://127.0.0.1:1/"]
    assert crl_urls(leaf) == ["http://127.0.0.1:1/ca.crl"]
    plain = pki.make_client_cert(*ca, "plain", not_before=NB, not_after=NA)[0]
    assert responder_urls(plain) == [] and crl_urls(plain) == []
    assert responder_urls(ca[0]) == [] and crl_urls(ca[0]) == []


def test_urls_keep_only_http_ocsp_and_full_name_uris(ca):
    uri = x509.UniformResourceIdentifier
    aia = x509.AuthorityInformationAccess([
        x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, uri("http://ca.example/ca.crt")),
        x509.AccessDescription(AuthorityInformationAccessOID.OCSP, uri("https://ocsp.example/")),
        x509.AccessDescription(AuthorityInformationAccessOID.OCSP, uri("ldap://ocsp.example/")),
        x509.AccessDescription(AuthorityInformationAccessOID.OCSP, uri("http://ocsp.example/")),
    ])
    cdp = x509.CRLDistributionPoints([
        x509.DistributionPoint(full_name=None, relative_name=x509.RelativeDistinguishedName(
            [x509.NameAttribute(x509.NameOID.COMMON_NAME, "crl")]), reasons=None, crl_issuer=None),
        x509.DistributionPoint(full_name=[uri("ldap://x/crl"), x509.DNSName("x"), uri("http://a/1.crl")],
                               relative_name=None, reasons=None, crl_issuer=None),
        x509.DistributionPoint(full_name=[uri("HTTP://b/2.crl")], relative_name=None, reasons=None, crl_issuer=None),
    ])
    key = pki.new_key()
    cert = (pki._builder(pki._name("odd"), ca[0].subject, key.public_key(), NB, NA)
            .add_extension(aia, critical=False).add_extension(cdp, critical=False).sign(ca[1], hashes.SHA256()))
    assert responder_urls(cert) == ["http://ocsp.example/"]
    assert crl_urls(cert) == ["http://a/1.crl", "HTTP://b/2.crl"]


# ---------------------------------------------------------------------------
# A real responder: openssl ocsp


def test_real_responder_good(ocsp_responder):
    cert, _ = ocsp_responder.issue("crm")
    assert responder_urls(cert) == [ocsp_responder.url]
    t = now()
    answer = check_response(ocsp_responder.query(cert), cert, ocsp_responder.ca_cert, t)
    assert answer.status == "good", answer
    assert answer.reason == "signed by a delegated responder"
    assert abs(answer.this_update - t) < 120
    assert abs(answer.next_update - (t + 86400)) < 120 and answer.revoked_at is None


def test_real_responder_revoked_after_restart(ocsp_responder):
    cert, _ = ocsp_responder.issue("crm")
    other, _ = ocsp_responder.issue("hr-system")
    assert check_response(ocsp_responder.query(cert), cert, ocsp_responder.ca_cert, now()).status == "good"
    when = pki._now() - dt.timedelta(minutes=5)
    ocsp_responder.revoke(cert.serial_number, when)
    answer = check_response(ocsp_responder.query(cert), cert, ocsp_responder.ca_cert, now())
    assert answer.status == "revoked", answer
    assert answer.revoked_at == when.timestamp()
    # the other certificate's answer is not touched by the revocation
    assert check_response(ocsp_responder.query(other), other, ocsp_responder.ca_cert, now()).status == "good"
    # and its answer does not vouch for the revoked one
    assert_error(check_response(ocsp_responder.query(other), cert, ocsp_responder.ca_cert, now()), "does not name")


def test_real_responder_unknown_serial(ocsp_responder):
    cert, _ = ocsp_responder.issue("stranger", listed=False)
    answer = check_response(ocsp_responder.query(cert), cert, ocsp_responder.ca_cert, now())
    assert answer.status == "unknown", answer


def test_real_responder_signed_by_the_ca_itself_and_with_short_next_update(tmp_path, ca):
    with OcspResponder(tmp_path, *ca, signer=ca, next_update_minutes=10) as responder:
        cert, _ = responder.issue("crm")
        t = now()
        answer = check_response(responder.query(cert), cert, ca[0], t)
        assert answer.status == "good" and answer.reason == "signed by the issuer", answer
        assert abs(answer.next_update - (t + 600)) < 120
        # eleven minutes on, the same response is stale
        assert_error(check_response(responder.query(cert), cert, ca[0], t + 660 + 300), "stale")


def test_real_responder_with_a_responder_certificate_of_another_ca(tmp_path, ca, other_ca):
    foreign = pki.make_ocsp_responder(other_ca, NB, NA)
    with OcspResponder(tmp_path, *ca, signer=foreign) as responder:
        cert, _ = responder.issue("crm")
        assert_error(check_response(responder.query(cert), cert, ca[0], now()), "did not issue")


def test_real_responder_survives_a_bad_request_and_restarts_on_the_same_port(ocsp_responder):
    # OpenSSL answers nothing to a request it cannot parse (it closes the connection only when the next
    # one comes), so send it and go; -ignore_err keeps the responder serving.
    body = b"not a request"
    with socket.create_connection(("127.0.0.1", ocsp_responder.port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.0\r\nContent-Type: application/ocsp-request\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    cert, _ = ocsp_responder.issue("crm")
    port = ocsp_responder.port
    ocsp_responder.revoke(cert.serial_number)
    assert ocsp_responder.port == port
    assert check_response(ocsp_responder.query(cert), cert, ocsp_responder.ca_cert, now()).status == "revoked"


# ---------------------------------------------------------------------------
# Honest responses built by hand: key types, CertID hashes, responder IDs


def test_issuer_signed_by_key_hash_and_sha256_certid(ca, leaf):
    der = response(leaf, ca[0], *ca, encoding=xocsp.OCSPResponderEncoding.HASH, algorithm=hashes.SHA256())
    answer = check_response(der, leaf, ca[0], now())
    assert answer.status == "good" and answer.reason == "signed by the issuer", answer


@pytest.mark.parametrize("kind", ["rsa-ca", "rsa-responder", "ed25519-responder", "ec-responder"])
def test_rsa_ec_and_ed25519_signatures(kind):
    ca_key = rsa.generate_private_key(65537, 2048) if kind == "rsa-ca" or kind == "rsa-responder" else None
    issuer = pki.make_ca("keys CA", not_before=NB, not_after=NA, key=ca_key)
    cert = pki.make_client_cert(*issuer, "crm", not_before=NB, not_after=NA)[0]
    if kind == "rsa-ca":
        signer, certs = issuer, ()
    else:
        key = {"rsa-responder": rsa.generate_private_key(65537, 2048), "ed25519-responder":
               ed25519.Ed25519PrivateKey.generate(), "ec-responder": pki.new_key()}[kind]
        signer = pki.make_ocsp_responder(issuer, NB, NA, key=key)
        certs = (signer[0],)
    answer = check_response(response(cert, issuer[0], *signer, certs=certs), cert, issuer[0], now())
    assert answer.status == "good", answer


def test_revoked_by_hand_carries_the_revocation_time(ca, leaf):
    when = (NOW - dt.timedelta(days=2)).replace(tzinfo=None)
    der = response(leaf, ca[0], *ca, status=xocsp.OCSPCertStatus.REVOKED, revoked_at=when)
    answer = check_response(der, leaf, ca[0], now())
    assert answer.status == "revoked" and answer.revoked_at == when.replace(tzinfo=UTC).timestamp(), answer


def test_no_next_update_is_accepted(ca, leaf):
    answer = check_response(response(leaf, ca[0], *ca, next_update=None), leaf, ca[0], now())
    assert answer.status == "good" and answer.next_update is None, answer


# ---------------------------------------------------------------------------
# What must never be "good"


def test_signed_by_an_unrelated_key_claiming_the_issuers_name(ca, leaf):
    impostor = pki.make_ca("OCSP unit CA", not_before=NB, not_after=NA)  # same name, another key
    assert impostor[0].subject == ca[0].subject
    assert_error(check_response(response(leaf, ca[0], *impostor), leaf, ca[0], now()), "bad signature")
    assert_error(check_response(response(leaf, ca[0], *impostor, certs=[impostor[0]]), leaf, ca[0], now()),
                 "bad signature")
    by_hash = response(leaf, ca[0], *impostor, encoding=xocsp.OCSPResponderEncoding.HASH)
    assert_error(check_response(by_hash, leaf, ca[0], now()), "neither the issuer")


def test_tampered_signature(ca, leaf):
    der = response(leaf, ca[0], *ca)
    sig = xocsp.load_der_ocsp_response(der).signature
    bad = der.replace(sig, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert bad != der
    assert_error(check_response(bad, leaf, ca[0], now()), "bad signature")


def test_signed_by_another_ca_without_the_ocsp_purpose(ca, other_ca, leaf):
    der = response(leaf, ca[0], *other_ca, certs=[other_ca[0]])
    assert_error(check_response(der, leaf, ca[0], now()), "did not issue")


def test_signed_by_a_certificate_of_the_issuer_without_the_ocsp_purpose(ca, leaf):
    no_eku = pki.make_ocsp_responder(ca, NB, NA, eku_ocsp=False)
    answer = check_response(response(leaf, ca[0], *no_eku, certs=[no_eku[0]]), leaf, ca[0], now())
    assert_error(answer, "without the OCSP-signing purpose")
    client = pki.make_client_cert(*ca, "crm", not_before=NB, not_after=NA)  # clientAuth, issued by the CA
    answer = check_response(response(leaf, ca[0], *client, certs=[client[0]]), leaf, ca[0], now())
    assert_error(answer, "without the OCSP-signing purpose")
    sub_ca = pki.make_ca("sub CA", not_before=NB, not_after=NA, issuer=ca)  # a CA the issuer certified
    answer = check_response(response(leaf, ca[0], *sub_ca, certs=[sub_ca[0]]), leaf, ca[0], now())
    assert_error(answer, "without the OCSP-signing purpose")


def test_delegated_responder_of_another_ca_or_expired_or_missing(ca, other_ca, leaf):
    foreign = pki.make_ocsp_responder(other_ca, NB, NA)
    assert_error(check_response(response(leaf, ca[0], *foreign, certs=[foreign[0]]), leaf, ca[0], now()),
                 "did not issue")
    expired = pki.make_ocsp_responder(ca, NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1))
    assert_error(check_response(response(leaf, ca[0], *expired, certs=[expired[0]]), leaf, ca[0], now()),
                 "outside its validity")
    good = pki.make_ocsp_responder(ca, NB, NA)
    assert_error(check_response(response(leaf, ca[0], *good), leaf, ca[0], now()), "neither the issuer")


def test_response_for_another_certificate(ca, other_ca, leaf):
    other = pki.make_client_cert(*ca, "other", not_before=NB, not_after=NA)[0]
    assert_error(check_response(response(other, ca[0], *ca), leaf, ca[0], now()), "does not name")
    # the same serial from another CA: the CertID's issuer hashes differ
    twin = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(other_ca[0].subject)
            .public_key(pki.new_key().public_key()).serial_number(leaf.serial_number)
            .not_valid_before(NB).not_valid_after(NA).sign(other_ca[1], hashes.SHA256()))
    der = response(twin, other_ca[0], *other_ca)
    assert_error(check_response(der, leaf, ca[0], now()), "does not name")


def test_stale_and_future_responses(ca, leaf):
    t = now()
    stale = response(leaf, ca[0], *ca, this_update=NOW - dt.timedelta(days=2), next_update=NOW - dt.timedelta(hours=1))
    answer = check_response(stale, leaf, ca[0], t)
    assert answer == Answer("error", "stale")
    # within the allowed clock skew it still counts, beyond it not
    recent = response(leaf, ca[0], *ca, next_update=NOW - dt.timedelta(seconds=60))
    assert check_response(recent, leaf, ca[0], NOW.timestamp()).status == "good"
    assert_error(check_response(recent, leaf, ca[0], NOW.timestamp(), skew_s=0), "stale")
    future = response(leaf, ca[0], *ca, this_update=NOW + dt.timedelta(hours=1), next_update=NOW + dt.timedelta(hours=2))
    assert_error(check_response(future, leaf, ca[0], NOW.timestamp()), "future")


@pytest.mark.parametrize("status", [s for s in xocsp.OCSPResponseStatus if s != xocsp.OCSPResponseStatus.SUCCESSFUL])
def test_unsuccessful_response_status(ca, leaf, status):
    der = xocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
    assert_error(check_response(der, leaf, ca[0], now()), "responder answered")


@pytest.mark.parametrize("der", [b"", b"garbage", b"\x30\x03\x0a\x01\x00", b"\x30" * 100])
def test_garbage(ca, leaf, der):
    assert check_response(der, leaf, ca[0], now()).status == "error"


def test_truncated_response(ca, leaf):
    der = response(leaf, ca[0], *ca)
    for cut in (1, 10, len(der) // 2):
        assert check_response(der[:-cut], leaf, ca[0], now()).status == "error"


# ---------------------------------------------------------------------------
# gateway certs init|issue --ocsp-url --crl-url


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(gateway_command(*args), cwd=cwd, capture_output=True, text=True, timeout=60)


def test_certs_init_and_issue_put_aia_and_cdp_into_client_certificates(tmp_path):
    proc = run("certs", "init", "pki", "--client", "x", "--ocsp-url", "http://127.0.0.1:1/",
               "--crl-url", "http://127.0.0.1:1/ca.crl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = tmp_path / "pki"
    x = pki.load_cert(d / "clients/x.crt")
    assert responder_urls(x) == ["http://127.0.0.1:1/"] and crl_urls(x) == ["http://127.0.0.1:1/ca.crl"]
    server = pki.load_cert(d / "server.crt")
    assert responder_urls(server) == [] and crl_urls(server) == []
    assert "--ocsp-url http://127.0.0.1:1/ --crl-url http://127.0.0.1:1/ca.crl" in (d / "README.md").read_text()

    proc = run("certs", "issue", "pki", "y", "--ocsp-url", "http://ocsp.test:8080/", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    y = pki.load_cert(d / "clients/y.crt")
    assert responder_urls(y) == ["http://ocsp.test:8080/"] and crl_urls(y) == []
    proc = run("certs", "issue", "pki", "z", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    z = pki.load_cert(d / "clients/z.crt")
    assert responder_urls(z) == [] and crl_urls(z) == []
    with pytest.raises(x509.ExtensionNotFound):
        z.extensions.get_extension_for_class(x509.AuthorityInformationAccess)


@pytest.mark.parametrize("flag,url", [("--ocsp-url", "https://ocsp.test/"), ("--crl-url", "ca.crl"),
                                      ("--ocsp-url", "http:///nohost"), ("--crl-url", "http://x/ä.crl"),
                                      ("--ocsp-url", "http://x:99999/")])
def test_certs_refuse_a_url_that_is_not_http(tmp_path, flag, url):
    proc = run("certs", "init", "pki", "--client", "x", flag, url, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"gateway: {flag} must be an http:// URL") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "pki").exists()
