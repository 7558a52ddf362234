"""A development PKI: `gateway certs init/issue/revoke`.

The gateway needs a CA, a server certificate, client certificates and a CRL
before it can say anything over mTLS. This module makes them with the
`cryptography` library alone (no openssl binary, no network), so that a fresh
checkout can run and test the front door. It is for local testing only: the CA
key sits unencrypted next to the certificates it signs.

Every user-facing problem is a PKIError with a one-line message. The helpers
`make_ca`, `make_client_cert`, `load_ca` and `write_pem` are public so that
tests can build the odd certificates (expired, wrong purpose, other CA) they need.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey, not_before: dt.datetime,
             not_after: dt.datetime) -> x509.CertificateBuilder:
    """A certificate's subject, issuer, key, a random serial and its validity: what CAs and leaves share."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
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
        _builder(subject, issuer[0].subject if issuer else subject, key, not_before, not_after)
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
) -> tuple[x509.Certificate, PrivateKey]:
    key = key or new_key()
    b = (
        _builder(subject, ca_cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
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
    return b.sign(ca_key, hashes.SHA256()), key


def make_client_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    name: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku: Sequence[str] | None = ("clientAuth",),
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A client certificate "CN=NAME,O=gateway example" with SAN URI spiffe://gateway.example/NAME.

    `eku` is a tuple of "clientAuth"/"serverAuth", or None for no ExtendedKeyUsage
    extension at all. The name is not checked here, so tests can make odd ones.
    """
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SPIFFE_PREFIX + name)]
    return _leaf(ca_cert, ca_key, _name(name), sans, not_before=not_before, not_after=not_after,
                 eku=eku, key=key)


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


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PKIError(f"bad client name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return name


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"--days must be a positive whole number, not {days!r}")
    return days


def _client_paths(dir: Path, name: str) -> tuple[Path, Path]:
    return dir / "clients" / f"{name}.crt", dir / "clients" / f"{name}.key"


# ---------------------------------------------------------------------------
# The three commands


def init(dir: Path, clients: list[str], days: int = DEFAULT_DAYS) -> None:
    """Create a CA, a localhost server certificate, one certificate per client and an empty CRL in DIR."""
    dir = Path(dir)
    _check_days(days)
    for name in clients:
        _check_name(name)
    dupes = sorted({n for n in clients if clients.count(n) > 1})
    if dupes:
        raise PKIError(f"client {dupes[0]!r} given more than once")
    targets = [dir / f for f in ("ca.key", "ca.crt", "server.key", "server.crt", "crl.pem")]
    targets += [p for n in clients for p in _client_paths(dir, n)]
    for path in targets:
        if path.exists():
            raise PKIError(f"{path} already exists; refusing to overwrite (use another folder or remove it)")
    try:
        (dir / "clients").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"{dir}: cannot create folder: {exc.strerror or exc}") from None

    now = _now()
    nb, na = now - _BACKDATE, now + dt.timedelta(days=days)
    ca_cert, ca_key = make_ca(not_before=nb, not_after=na)
    # The CA key first: if this fails nothing else is written, and a second run is refused only once it exists.
    write_pem(dir / "ca.key", ca_key)
    write_pem(dir / "ca.crt", ca_cert)
    server_cert, server_key = make_server_cert(ca_cert, ca_key, not_before=nb, not_after=na)
    write_pem(dir / "server.key", server_key)
    write_pem(dir / "server.crt", server_cert)
    for name in clients:
        cert, key = make_client_cert(ca_cert, ca_key, name, not_before=nb, not_after=na)
        crt_path, key_path = _client_paths(dir, name)
        write_pem(key_path, key)
        write_pem(crt_path, cert)
    write_pem(dir / "crl.pem", make_crl(ca_cert, ca_key, number=1, last_update=now, next_update=na))
    _write_atomic(dir / "README.md", _readme(dir, clients, days, na).encode(), 0o644)


def _readme(dir: Path, clients: list[str], days: int, until: dt.datetime) -> str:
    flags = "".join(f" --client {n}" for n in clients)
    days_flag = "" if days == DEFAULT_DAYS else f" --days {days}"
    listing = "".join(f"- `clients/{n}.crt`, `clients/{n}.key`: client \"CN={n},O={ORG}\", "
                      f"SAN URI `{SPIFFE_PREFIX}{n}`\n" for n in clients)
    return f"""# Development PKI: for local testing only

**Never use these keys in production.** Every private key here, the CA's included,
is unencrypted and (when committed) public: anyone can mint a client certificate
that this CA vouches for.

Made with:

    gateway certs init {dir.name or dir}{flags}{days_flag}

Valid until {until:%Y-%m-%d} (UTC).

- `ca.crt`, `ca.key`: the CA ("CN={CA_CN},O={ORG}"), EC P-256
- `server.crt`, `server.key`: the gateway's certificate for localhost, 127.0.0.1 and ::1
{listing}- `crl.pem`: the CA's certificate revocation list

More clients and revocations:

    gateway certs issue {dir.name or dir} NAME [--days N]     # clients/NAME.crt and .key
    gateway certs revoke {dir.name or dir} NAME               # adds NAME to crl.pem

A running gateway picks up a rewritten `crl.pem` on SIGHUP.
"""


def issue(dir: Path, name: str, days: int = DEFAULT_ISSUE_DAYS) -> Path:
    """Issue clients/NAME.crt and .key from DIR's CA; returns the certificate's path.

    The certificate never outlives the CA: its end is capped at the CA's.
    """
    dir = Path(dir)
    _check_name(name)
    _check_days(days)
    crt_path, key_path = _client_paths(dir, name)
    for path in (crt_path, key_path):
        if path.exists():
            raise PKIError(f"{path} already exists; refusing to overwrite")
    ca_cert, ca_key = load_ca(dir)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise PKIError(f"{dir / 'ca.crt'}: the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}")
    cert, key = make_client_cert(ca_cert, ca_key, name, not_before=now - _BACKDATE, not_after=not_after)
    crt_path.parent.mkdir(parents=True, exist_ok=True)
    write_pem(key_path, key)
    write_pem(crt_path, cert)
    return crt_path


def revoke(dir: Path, name: str) -> int:
    """Add clients/NAME.crt to DIR/crl.pem (re-signed, CRL number + 1); returns its serial.

    Already-revoked certificates keep their entries; revoking one twice changes nothing.
    """
    return _revoke(Path(dir), name)[0]


def _revoke(dir: Path, name: str) -> tuple[int, bool]:
    """revoke(), also saying whether crl.pem was rewritten (False: already listed)."""
    _check_name(name)
    crt_path, _ = _client_paths(dir, name)
    cert = load_cert(crt_path)
    ca_cert, ca_key = load_ca(dir)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"{crt_path}: not issued by {dir / 'ca.crt'}") from None
    crl_path = dir / "crl.pem"
    crl = load_crl(crl_path)
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise PKIError(f"{crl_path}: not signed by {dir / 'ca.crt'}")
    serial = cert.serial_number
    if crl.get_revoked_certificate_by_serial_number(serial) is not None:
        return serial, False

    now = _now()
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        number = 1
    # Keep the CRL's lifetime: never earlier than before, and the same span from now.
    old_next = crl.next_update_utc
    span = (old_next - crl.last_update_utc) if old_next else dt.timedelta(days=DEFAULT_DAYS)
    next_update = max(old_next or now, now + max(span, dt.timedelta(days=1)))
    entries = [_revoked_entry(r.serial_number, r.revocation_date_utc, r.extensions) for r in crl]
    entries.append(_revoked_entry(serial, now))
    write_pem(crl_path, make_crl(ca_cert, ca_key, number=number, last_update=now,
                                 next_update=next_update, revoked=entries))
    return serial, True


# ---------------------------------------------------------------------------
# Command line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `certs init|issue|revoke` on the `gateway` command's subparsers."""
    certs = subparsers.add_parser(
        "certs", help="make a development PKI (CA, server, clients, CRL) for local testing",
        description="A development PKI for local testing only: never use its keys in production.",
    )
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("init", help="create a CA, a localhost server certificate, client certificates and an empty CRL",
                       description="Create DIR/ca.crt+key, DIR/server.crt+key (localhost, 127.0.0.1, ::1), "
                                   "DIR/clients/NAME.crt+key for each --client, DIR/crl.pem and DIR/README.md. "
                                   "Refuses to overwrite existing files.")
    p.add_argument("dir", metavar="DIR", type=Path, help="folder to create the PKI in")
    p.add_argument("--client", metavar="NAME", action="append", default=[],
                   help="issue a client certificate CN=NAME,O=gateway example (repeatable)")
    p.add_argument("--days", metavar="N", type=int, default=DEFAULT_DAYS,
                   help=f"validity of every certificate and of the CRL, in days (default {DEFAULT_DAYS})")

    p = sub.add_parser("issue", help="issue one more client certificate from DIR's CA",
                       description="Write DIR/clients/NAME.crt and NAME.key, signed by DIR/ca.key.")
    p.add_argument("dir", metavar="DIR", type=Path, help="folder made by `gateway certs init`")
    p.add_argument("name", metavar="NAME", help="client name: the certificate's CN")
    p.add_argument("--days", metavar="N", type=int, default=DEFAULT_ISSUE_DAYS,
                   help=f"validity in days (default {DEFAULT_ISSUE_DAYS}; never past the CA's end)")

    p = sub.add_parser("revoke", help="revoke a client certificate and rewrite DIR/crl.pem",
                       description="Add DIR/clients/NAME.crt's serial to DIR/crl.pem and re-sign it. "
                                   "A running gateway picks it up on SIGHUP.")
    p.add_argument("dir", metavar="DIR", type=Path, help="folder made by `gateway certs init`")
    p.add_argument("name", metavar="NAME", help="client name, as in DIR/clients/NAME.crt")
    return certs


def cli_main(args: argparse.Namespace) -> int:
    """Run `gateway certs ...` from parsed arguments; 0 on success, 1 with a one-line error."""
    try:
        if args.certs_command == "init":
            init(args.dir, args.client, args.days)
            who = f" and {len(args.client)} client(s): {', '.join(args.client)}" if args.client else ""
            print(f"wrote a development PKI to {args.dir}: CA, server (localhost){who}, empty crl.pem")
        elif args.certs_command == "issue":
            path = issue(args.dir, args.name, args.days)
            print(f"wrote {path} and {path.with_suffix('.key')}")
        elif args.certs_command == "revoke":
            serial, changed = _revoke(Path(args.dir), args.name)
            crl = Path(args.dir) / "crl.pem"
            if changed:
                print(f"revoked {args.name} (serial {serial:#x}); wrote {crl}")
            else:
                print(f"{args.name} (serial {serial:#x}) was already revoked; {crl} unchanged")
        else:  # pragma: no cover - argparse requires one of the above
            raise PKIError(f"unknown certs command {args.certs_command!r}")
    except PKIError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gateway: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
