"""The building blocks of a PKI for development and tests: keys, CAs, client and server certificates, CRLs.

The gateway needs a CA, a server certificate, client certificates and a CRL
before it can say anything over mTLS. This module makes them with the
`cryptography` library alone (no openssl binary, no network), so that a fresh
checkout can run and test the front door; `gateway certs` (tools/certs.py) puts
them in a folder. It is for local testing only: the CA key sits unencrypted next
to the certificates it signs.

Every user-facing problem is a PKIError with a one-line message. The helpers
`make_ca`, `make_client_cert`, `make_ocsp_responder`, `load_ca` and `write_pem` are
public so that tests can build the odd certificates (expired, wrong purpose, other
CA, an OCSP responder without its purpose) they need. `ocsp_url`/`crl_url` put the
addresses a revocation checker follows (AuthorityInformationAccess,
CRLDistributionPoints) into client certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 3700          # init: a committed PKI stays valid past 2036
DEFAULT_ISSUE_DAYS = 365     # issue: one more client certificate
ORG = "gateway example"
CA_CN = "gateway example CA"
SERVER_CN = "localhost"
SPIFFE_PREFIX = "spiffe://gateway.example/"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_EKU = {"clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH, "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH}
_BACKDATE = dt.timedelta(hours=1)

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = CertificatePublicKeyTypes
PemObject = x509.Certificate | x509.CertificateRevocationList | PrivateKey


class PKIError(Exception):
    """A problem the user can fix (missing file, bad name, file already there), on one line."""


# ---------------------------------------------------------------------------
# Building blocks


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def new_key() -> PrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    # O first, CN last, so rfc4514_string() reads "CN=...,O=gateway example".
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())


def _builder(subject: x509.Name, issuer: x509.Name, public_key: PublicKey, not_before: dt.datetime,
             not_after: dt.datetime) -> x509.CertificateBuilder:
    """A certificate's subject, issuer, key, a random serial and its validity: what CAs and leaves share."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def make_ca(
    common_name: str = CA_CN,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    path_length: int | None = 1,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A CA certificate: self-signed, or an intermediate when `issuer` is (cert, key)."""
    key = key or new_key()
    subject = _name(common_name)
    b = (
        _builder(subject, issuer[0].subject if issuer else subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        b = b.add_extension(_aki(issuer[0]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku: Sequence[str] | None,
    key: PrivateKey | None,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    key = key or new_key()
    return _leaf_for(ca_cert, ca_key, subject, sans, key.public_key(), not_before=not_before,
                     not_after=not_after, eku=eku, ocsp_url=ocsp_url, crl_url=crl_url), key


def _revocation_pointers(b: x509.CertificateBuilder, ocsp_url: str | None,
                         crl_url: str | None) -> x509.CertificateBuilder:
    """Where a relying party asks about this certificate: an OCSP responder (AIA) and a CRL (CDP)."""
    if ocsp_url:
        b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    if crl_url:
        b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None,
            crl_issuer=None)]), critical=False)
    return b


def _leaf_for(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    public_key: PublicKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku: Sequence[str] | None,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> x509.Certificate:
    """An end-entity certificate for a public key (ours, or one from an integrator's request)."""
    b = (
        _builder(subject, ca_cert.subject, public_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku is not None:
        try:
            usages = [_EKU[u] for u in eku]
        except KeyError as exc:
            raise PKIError(f"unknown extended key usage {exc.args[0]!r} (use clientAuth or serverAuth)") from None
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return _revocation_pointers(b, ocsp_url, crl_url).sign(ca_key, hashes.SHA256())


def make_client_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    name: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku: Sequence[str] | None = ("clientAuth",),
    key: PrivateKey | None = None,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A client certificate "CN=NAME,O=gateway example" with SAN URI spiffe://gateway.example/NAME.

    `eku` is a tuple of "clientAuth"/"serverAuth", or None for no ExtendedKeyUsage
    extension at all. `ocsp_url`/`crl_url` add AuthorityInformationAccess (OCSP) and
    CRLDistributionPoints. The name is not checked here, so tests can make odd ones.
    """
    return _leaf(ca_cert, ca_key, _name(name), _client_sans(name), not_before=not_before, not_after=not_after,
                 eku=eku, key=key, ocsp_url=ocsp_url, crl_url=crl_url)


def _client_sans(name: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(SPIFFE_PREFIX + name)]


def make_client_cert_for(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    name: str,
    public_key: PublicKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> x509.Certificate:
    """The client certificate NAME for a public key whose private key stays with its holder (a CSR's)."""
    return _leaf_for(ca_cert, ca_key, _name(name), _client_sans(name), public_key, not_before=not_before,
                     not_after=not_after, eku=("clientAuth",), ocsp_url=ocsp_url, crl_url=crl_url)


def make_ocsp_responder(
    ca: tuple[x509.Certificate, PrivateKey],
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku_ocsp: bool = True,
    *,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A delegated OCSP responder certificate issued by `ca` (cert, key), as RFC 6960 4.2.2.2 wants it:
    extendedKeyUsage id-kp-OCSPSigning and id-pkix-ocsp-nocheck. With `eku_ocsp=False` it has no
    extendedKeyUsage at all, the certificate a client must not accept responses from."""
    ca_cert, ca_key = ca
    key = key or new_key()
    cns = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = f"{cns[0].value if cns else 'CA'} OCSP responder"[:64]
    b = (
        _builder(_name(cn), ca_cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if eku_ocsp:
        b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
             .add_extension(x509.OCSPNoCheck(), critical=False))
    return b.sign(ca_key, hashes.SHA256()), key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A serverAuth certificate for `dns` names and `ips` (default localhost, 127.0.0.1, ::1)."""
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cn = dns[0] if dns else SERVER_CN
    return _leaf(ca_cert, ca_key, _name(cn), sans, not_before=not_before, not_after=not_after,
                 eku=("serverAuth",), key=key)


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    number: int,
    last_update: dt.datetime,
    next_update: dt.datetime,
    revoked: Sequence[x509.RevokedCertificate] = (),
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA with a CRL number and AuthorityKeyIdentifier."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    for entry in revoked:
        b = b.add_revoked_certificate(entry)
    return b.sign(ca_key, hashes.SHA256())


def _revoked_entry(serial: int, when: dt.datetime, extensions=()) -> x509.RevokedCertificate:
    b = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
    for ext in extensions:
        b = b.add_extension(ext.value, ext.critical)
    return b.build()


# ---------------------------------------------------------------------------
# Files


def write_pem(path: Path, obj: PemObject) -> None:
    """Write a certificate, CRL or private key as PEM, atomically (temp file, then os.replace).

    Private keys are PKCS8, unencrypted, mode 0600; everything else mode 0644.
    """
    path = Path(path)
    if isinstance(obj, (x509.Certificate, x509.CertificateRevocationList)):
        data, mode = obj.public_bytes(serialization.Encoding.PEM), 0o644
    elif hasattr(obj, "private_bytes"):
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        mode = 0o600
    else:
        raise TypeError(f"cannot write {type(obj).__name__} as PEM")
    _write_atomic(path, data, mode)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600, so a key is never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file ({what})") from None
    except OSError as exc:
        raise PKIError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _load_pem(path: Path, what: str, loader):
    path = Path(path)
    try:
        return loader(_read(path, what))
    except ValueError:
        raise PKIError(f"{path}: not a PEM {what}") from None


def load_cert(path: Path) -> x509.Certificate:
    """Read a PEM certificate, or raise PKIError."""
    return _load_pem(path, "certificate", x509.load_pem_x509_certificate)


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """Read a PEM CRL, or raise PKIError."""
    return _load_pem(path, "CRL", x509.load_pem_x509_crl)


def load_ca(dir: Path) -> tuple[x509.Certificate, PrivateKey]:
    """DIR/ca.crt and DIR/ca.key, checked to belong together."""
    dir = Path(dir)
    cert = load_cert(dir / "ca.crt")
    key_path = dir / "ca.key"
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA private key"), password=None)
    except (ValueError, TypeError):
        raise PKIError(f"{key_path}: not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise PKIError(f"{key_path}: does not match {dir / 'ca.crt'}")
    return cert, key
