"""gateway.core.identity and gateway.shell.token."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import stat
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from gateway.core.identity import format_fingerprint, identity_from_der
from gateway.tools.pki import make_ca, make_client_cert, new_key
from gateway.shell.token import ISSUER, TokenIssuer, TokenVerifier, load_or_create_key, thumbprint

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
DAYS = dt.timedelta(days=1)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca():
    return make_ca("Test CA", not_before=NOW - DAYS, not_after=NOW + DAYS)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_identity_from_client_cert(ca):
    cert, _ = make_client_cert(*ca, "hr-system", not_before=NOW - DAYS, not_after=NOW + DAYS)
    raw = der(cert)
    ident = identity_from_der(raw)
    assert ident.subject == "CN=hr-system,O=gateway example"
    assert ident.issuer == "CN=Test CA,O=gateway example"
    assert ident.common_name == "hr-system"
    assert ident.san_uri == ("spiffe://gateway.example/hr-system",)
    assert ident.san_dns == () and ident.san_email == ()
    digest = hashlib.sha256(raw).hexdigest().upper()
    assert ident.fingerprint_sha256 == ":".join(digest[i:i + 2] for i in range(0, 64, 2))
    assert ident.serial == format(cert.serial_number, "x") and ident.serial == ident.serial.lower()
    assert int(ident.serial, 16) == cert.serial_number
    assert ident.not_before == NOW - DAYS and ident.not_after == NOW + DAYS
    assert ident.audit_fields() == {"subject": ident.subject, "issuer": ident.issuer,
                                    "serial": ident.serial, "fingerprint_sha256": ident.fingerprint_sha256}


def _custom_cert(ca, name: x509.Name, sans: list | None, serial: int = 0x0ABC) -> bytes:
    key = new_key()
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(ca[0].subject).public_key(key.public_key())
         .serial_number(serial).not_valid_before(NOW - DAYS).not_valid_after(NOW + DAYS))
    if sans == []:  # an empty SAN (RFC 5280 forbids it; cryptography 51 will not build or parse one)
        b = b.add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x00"),
                            critical=False)
    elif sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return der(b.sign(ca[1], hashes.SHA256()))


def test_identity_sans_and_escaping(ca):
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme, Inc"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "svc+1")])
    sans = [x509.DNSName("a.example"), x509.DNSName("b.example"), x509.UniformResourceIdentifier("spiffe://acme/x"),
            x509.RFC822Name("ops@example.org")]
    ident = identity_from_der(_custom_cert(ca, name, sans))
    assert ident.subject == r"CN=svc\+1,O=Acme\, Inc"
    assert ident.common_name == "svc+1"
    assert ident.san_dns == ("a.example", "b.example")
    assert ident.san_uri == ("spiffe://acme/x",)
    assert ident.san_email == ("ops@example.org",)
    assert ident.serial == "abc"


def test_identity_without_san_or_with_two_cns(ca):
    two = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.COMMON_NAME, "b")])
    ident = identity_from_der(_custom_cert(ca, two, None))
    assert ident.common_name is None
    assert (ident.san_dns, ident.san_uri, ident.san_email) == ((), (), ())
    none = identity_from_der(_custom_cert(ca, x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o")]), []))
    assert none.common_name is None and none.subject == "O=o"
    assert (none.san_dns, none.san_uri, none.san_email) == ((), (), ())


def test_format_fingerprint():
    assert format_fingerprint(bytes([0, 1, 0xAB, 0xFF])) == "00:01:AB:FF"


# -- tokens -------------------------------------------------------------------

FP = ":".join(["AB"] * 32)


def _pair(kind: str):
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else ed25519.Ed25519PrivateKey.generate()
    return key, key.public_key()


@pytest.mark.parametrize("kind, alg", [("ec", "ES256"), ("ed25519", "EdDSA")])
def test_round_trip_and_claims(kind, alg):
    key, pub = _pair(kind)
    clock = Clock(time.time())
    token = TokenIssuer(key, "automation-api", 60, clock=clock).token("hr-system", FP)
    assert jwt.get_unverified_header(token)["alg"] == alg
    claims = TokenVerifier(pub, "automation-api").verify(token)
    assert claims["sub"] == "hr-system" and claims["aud"] == "automation-api" and claims["iss"] == ISSUER
    assert claims["exp"] - claims["iat"] == 60
    assert claims["iat"] == int(clock.now)
    assert claims["fingerprint_sha256"] == FP
    expected = base64.urlsafe_b64encode(bytes([0xAB] * 32)).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": expected} and thumbprint(FP) == expected
    assert "=" not in expected


def test_thumbprint_of_a_real_certificate(ca):
    cert, _ = make_client_cert(*ca, "crm", not_before=NOW - DAYS, not_after=NOW + DAYS)
    ident = identity_from_der(der(cert))
    raw = cert.fingerprint(hashes.SHA256())
    assert thumbprint(ident.fingerprint_sha256) == base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_cached_token_reused_while_more_than_half_life_left():
    key, _ = _pair("ec")
    clock = Clock(1_000_000.0)
    issuer = TokenIssuer(key, "aud", 60, clock=clock)
    first = issuer.token("a", FP)
    clock.now += 29
    assert issuer.token("a", FP) == first
    assert issuer.token("b", FP) != first                     # per client
    assert issuer.token("a", FP.replace("AB", "CD", 1)) != first  # per certificate
    clock.now += 1                                            # exactly half left: renew
    second = issuer.token("a", FP)
    assert second != first
    assert jwt.decode(second, options={"verify_signature": False})["iat"] == 1_000_030
    clock.now += 29
    assert issuer.token("a", FP) == second


def _forge(header: dict, claims: dict, sig: bytes = b"") -> str:
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = enc(json.dumps(header).encode()) + "." + enc(json.dumps(claims).encode())
    return head + "." + enc(sig)


@pytest.mark.parametrize("kind", ["ec", "ed25519"])
def test_verifier_refuses(kind):
    key, pub = _pair(kind)
    verifier = TokenVerifier(pub, "automation-api")
    now = time.time()
    good = TokenIssuer(key, "automation-api", 60, clock=Clock(now)).token("c", FP)
    claims = jwt.decode(good, options={"verify_signature": False})
    bad = {
        "missing": None, "empty": "",
        "expired": TokenIssuer(key, "automation-api", 60, clock=Clock(now - 600)).token("c", FP),
        "audience": TokenIssuer(key, "other-api", 60, clock=Clock(now)).token("c", FP),
        "key": TokenIssuer(_pair(kind)[0], "automation-api", 60, clock=Clock(now)).token("c", FP),
        "none": _forge({"alg": "none", "typ": "JWT"}, claims),
        "None": _forge({"alg": "None", "typ": "JWT"}, claims),
        "tampered": good.split(".")[0] + "." + _forge({}, {**claims, "sub": "crm"}).split(".")[1]
        + "." + good.split(".")[2],
        "issuer": jwt.encode({**claims, "iss": "someone"}, key, algorithm=jwt.get_unverified_header(good)["alg"]),
        "no-sub": jwt.encode({k: v for k, v in claims.items() if k != "sub"}, key,
                             algorithm=jwt.get_unverified_header(good)["alg"]),
    }
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _forge({"alg": "HS256", "typ": "JWT"}, claims).rsplit(".", 1)[0]
    bad["hs256-confusion"] = head + "." + base64.urlsafe_b64encode(
        hmac.new(pem, head.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    assert verifier.verify(good)["sub"] == "c"
    accepted = []
    for what, token in bad.items():
        try:
            verifier.verify(token)
            accepted.append(what)
        except PermissionError as exc:
            assert "identity token" in str(exc)
    assert accepted == []


def test_only_p256_and_ed25519_keys():
    with pytest.raises(ValueError):
        TokenIssuer(ec.generate_private_key(ec.SECP384R1()), "aud", 60)
    with pytest.raises(ValueError):
        TokenVerifier(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(), "aud")


def test_load_or_create_key(tmp_path):
    path = tmp_path / "keys" / "identity.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    content = path.read_bytes()
    again = load_or_create_key(path)
    assert path.read_bytes() == content
    assert again.private_numbers() == key.private_numbers()
    token = TokenIssuer(again, "aud", 60).token("c", FP)
    assert TokenVerifier(key.public_key(), "aud").verify(token)["sub"] == "c"
