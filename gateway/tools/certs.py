"""`gateway certs init|issue|sign|revoke`: a PKI folder for development, and an integrator's onboarding.

init makes a CA, a server certificate, client certificates and an empty CRL; issue adds a
client certificate and its key; sign makes a client certificate for an integrator's
certificate request, so that its private key never leaves the integrator; revoke puts a
client's certificate on the CRL. The certificates are built by gateway/tools/pki.py.
init and issue can point the client certificates at an OCSP responder and a CRL address
(--ocsp-url, --crl-url), for trying out the gateway's online revocation checks.

Every problem the user can fix is a PKIError on one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.tools.pki import (
    _BACKDATE, CA_CN, DEFAULT_DAYS, DEFAULT_ISSUE_DAYS, NAME_RE, ORG, SPIFFE_PREFIX, PKIError, _now, _read,
    _revoked_entry, _write_atomic, load_ca, load_cert, load_crl, make_ca, make_client_cert, make_client_cert_for,
    make_crl, make_server_cert, write_pem,
)

MIN_RSA_BITS = 2048
CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)   # what OpenSSL's default security level takes


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PKIError(f"bad client name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return name


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"--days must be a positive whole number, not {days!r}")
    return days


def _check_url(url: str | None, flag: str) -> str | None:
    """An http:// URL with a host, in ASCII (a certificate's URI is an IA5String); None stays None."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        ok = url.isascii() and not any(c.isspace() for c in url) and parts.scheme == "http" \
            and bool(parts.hostname) and (parts.port is None or parts.port > 0)  # .port raises on a bad one
    except ValueError:
        ok = False
    if not ok:
        raise PKIError(f"{flag} must be an http:// URL with a host, not {url!r}")
    return url


def _client_paths(dir: Path, name: str) -> tuple[Path, Path]:
    return dir / "clients" / f"{name}.crt", dir / "clients" / f"{name}.key"


# ---------------------------------------------------------------------------
# The commands


def init(dir: Path, clients: list[str], days: int = DEFAULT_DAYS, *, ocsp_url: str | None = None,
         crl_url: str | None = None) -> None:
    """Create a CA, a localhost server certificate, one certificate per client and an empty CRL in DIR.

    `ocsp_url`/`crl_url` go into every client certificate (AuthorityInformationAccess, CRLDistributionPoints).
    """
    dir = Path(dir)
    _check_days(days)
    _check_url(ocsp_url, "--ocsp-url")
    _check_url(crl_url, "--crl-url")
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
        cert, key = make_client_cert(ca_cert, ca_key, name, not_before=nb, not_after=na, ocsp_url=ocsp_url,
                                     crl_url=crl_url)
        crt_path, key_path = _client_paths(dir, name)
        write_pem(key_path, key)
        write_pem(crt_path, cert)
    write_pem(dir / "crl.pem", make_crl(ca_cert, ca_key, number=1, last_update=now, next_update=na))
    _write_atomic(dir / "README.md", _readme(dir, clients, days, na, ocsp_url, crl_url).encode(), 0o644)


def _readme(dir: Path, clients: list[str], days: int, until: dt.datetime, ocsp_url: str | None = None,
            crl_url: str | None = None) -> str:
    flags = "".join(f" --client {n}" for n in clients)
    days_flag = "" if days == DEFAULT_DAYS else f" --days {days}"
    days_flag += (f" --ocsp-url {ocsp_url}" if ocsp_url else "") + (f" --crl-url {crl_url}" if crl_url else "")
    listing = "".join(f"- `clients/{n}.crt`, `clients/{n}.key`: client \"CN={n},O={ORG}\", "
                      f"SAN URI `{SPIFFE_PREFIX}{n}`\n" for n in clients)
    folder = dir.name or dir
    return f"""# Development PKI: for local testing only

**Never use these keys in production.** Every private key here, the CA's included,
is unencrypted and (when committed) public: anyone can mint a client certificate
that this CA vouches for.

Made with:

    gateway certs init {folder}{flags}{days_flag}

Valid until {until:%Y-%m-%d} (UTC).

- `ca.crt`, `ca.key`: the CA ("CN={CA_CN},O={ORG}"), EC P-256
- `server.crt`, `server.key`: the gateway's certificate for localhost, 127.0.0.1 and ::1
{listing}- `crl.pem`: the CA's certificate revocation list

More clients and revocations:

    gateway certs issue {folder} NAME [--days N] [--force]      # clients/NAME.crt and .key
    gateway certs sign {folder} REQUEST.csr NAME [--days N]     # clients/NAME.crt for an integrator's key
    gateway certs revoke {folder} NAME                          # adds NAME to crl.pem

A running gateway picks up a rewritten `crl.pem` within `reload.watch_s` (or on SIGHUP).
"""


def _make_room(paths: tuple[Path, ...], force: bool, serial_of: Path) -> list[Path]:
    """Refuse to overwrite a client's files, or with --force move them aside as NAME.crt.<serial>."""
    present = [p for p in paths if p.exists()]
    if not present:
        return []
    if not force:
        raise PKIError(f"{present[0]} already exists; refusing to overwrite "
                       "(--force moves the earlier files aside, e.g. after a revoke)")
    suffix = format(load_cert(serial_of).serial_number, "x") if serial_of.exists() else _now().strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for path in present:
        aside = path.with_name(f"{path.name}.{suffix}")
        path.replace(aside)
        moved.append(aside)
    return moved


def _client_validity(dir: Path, ca_cert: x509.Certificate, days: int) -> tuple[dt.datetime, dt.datetime]:
    """From an hour ago to `days` ahead, never past the CA's own end."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise PKIError(f"{dir / 'ca.crt'}: the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}")
    return now - _BACKDATE, not_after


def issue(dir: Path, name: str, days: int = DEFAULT_ISSUE_DAYS, force: bool = False, *,
          ocsp_url: str | None = None, crl_url: str | None = None) -> Path:
    """Issue clients/NAME.crt and .key from DIR's CA; returns the certificate's path.

    The certificate never outlives the CA. With `force`, an earlier NAME's files are moved aside
    (NAME.crt.<serial>, NAME.key.<serial>), as after a revoke. `ocsp_url`/`crl_url` as for init.
    """
    dir = Path(dir)
    _check_name(name)
    _check_days(days)
    _check_url(ocsp_url, "--ocsp-url")
    _check_url(crl_url, "--crl-url")
    crt_path, key_path = _client_paths(dir, name)
    ca_cert, ca_key = load_ca(dir)
    not_before, not_after = _client_validity(dir, ca_cert, days)
    _make_room((crt_path, key_path), force, crt_path)
    cert, key = make_client_cert(ca_cert, ca_key, name, not_before=not_before, not_after=not_after,
                                 ocsp_url=ocsp_url, crl_url=crl_url)
    crt_path.parent.mkdir(parents=True, exist_ok=True)
    write_pem(key_path, key)
    write_pem(crt_path, cert)
    return crt_path


def _request(path: Path) -> x509.CertificateSigningRequest:
    data = _read(Path(path), "certificate request")
    try:
        csr = x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
    except ValueError:
        raise PKIError(f"{path}: not a certificate request (PEM or DER CSR)") from None
    if not csr.is_signature_valid:
        raise PKIError(f"{path}: the request's signature does not verify: it was not made with the key it carries")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise PKIError(f"{path}: an RSA key of {key.key_size} bits is too weak (at least {MIN_RSA_BITS})")
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, CURVES):
        raise PKIError(f"{path}: the curve {key.curve.name} is not one TLS clients are authenticated with here "
                       "(use P-256, P-384 or P-521)")
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise PKIError(f"{path}: a {type(key).__name__} key cannot authenticate a TLS client here "
                       "(use EC P-256/P-384, RSA or Ed25519)")
    return csr


def sign(dir: Path, csr_path: Path, name: str, days: int = DEFAULT_ISSUE_DAYS,
         force: bool = False) -> tuple[Path, x509.Certificate, x509.CertificateSigningRequest]:
    """clients/NAME.crt for the key of an integrator's request, signed by DIR's CA; the private key stays
    with the integrator. The CA decides what the certificate says: the subject CN=NAME,O=..., the client's
    SAN URI and the clientAuth purpose; the request's own subject and extensions are not copied."""
    dir = Path(dir)
    _check_name(name)
    _check_days(days)
    csr = _request(Path(csr_path))
    crt_path, key_path = _client_paths(dir, name)
    ca_cert, ca_key = load_ca(dir)
    not_before, not_after = _client_validity(dir, ca_cert, days)
    _make_room((crt_path, key_path), force, crt_path)
    cert = make_client_cert_for(ca_cert, ca_key, name, csr.public_key(), not_before=not_before, not_after=not_after)
    crt_path.parent.mkdir(parents=True, exist_ok=True)
    write_pem(crt_path, cert)
    return crt_path, cert, csr


def _still_valid_earlier(dir: Path, name: str) -> str | None:
    """A note when --force moves aside a certificate that still works (not on the CRL, not expired)."""
    crt_path, _ = _client_paths(dir, name)
    try:
        cert, crl = load_cert(crt_path), load_crl(dir / "crl.pem")
    except PKIError:
        return None
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None \
            or cert.not_valid_after_utc <= _now():
        return None
    return (f"note: the earlier {name} certificate (serial {cert.serial_number:#x}) is not revoked and stays valid "
            f"until {cert.not_valid_after_utc:%Y-%m-%d}; if it must stop working: "
            f"gateway certs revoke {dir} {name} --serial {cert.serial_number:x}")


def revoke(dir: Path, name: str, serial: int | None = None) -> int:
    """Add clients/NAME.crt (or, given `serial`, NAME's certificate of that serial, one an earlier --force
    moved aside included) to DIR/crl.pem, re-signed with CRL number + 1; returns its serial.

    Already-revoked certificates keep their entries; revoking one twice changes nothing.
    """
    return _revoke(Path(dir), name, serial)[0]


def _certificate_of(dir: Path, name: str, serial: int | None) -> tuple[Path, x509.Certificate]:
    crt_path, _ = _client_paths(dir, name)
    if serial is None:
        return crt_path, load_cert(crt_path)
    for path in [crt_path, *sorted(crt_path.parent.glob(f"{crt_path.name}.*"))]:
        if path.is_file():
            cert = load_cert(path)
            if cert.serial_number == serial:
                return path, cert
    raise PKIError(f"{crt_path.parent}: no certificate of {name} with serial {serial:#x}")


def _revoke(dir: Path, name: str, serial: int | None = None) -> tuple[int, bool]:
    """revoke(), also saying whether crl.pem was rewritten (False: already listed)."""
    _check_name(name)
    crt_path, cert = _certificate_of(dir, name, serial)
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
    """Register `certs init|issue|sign|revoke` on the `gateway` command's subparsers."""
    certs = subparsers.add_parser(
        "certs", help="a development PKI (CA, server, clients, CRL), and client certificates for integrators",
        description="A development PKI: never use the keys `init` and `issue` write in production. `sign` "
                    "certifies an integrator's own key from its certificate request.",
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
    _revocation_options(p)

    p = sub.add_parser("issue", help="issue one more client certificate (and its key) from DIR's CA",
                       description="Write DIR/clients/NAME.crt and NAME.key, signed by DIR/ca.key.")
    p.add_argument("dir", metavar="DIR", type=Path, help="folder made by `gateway certs init`")
    _client_options(p)
    _revocation_options(p)

    p = sub.add_parser("sign", help="sign an integrator's certificate request as client NAME (its key stays with it)",
                       description="Write DIR/clients/NAME.crt for the public key of CSR (PEM or DER), signed by "
                                   "DIR/ca.key: subject CN=NAME,O=gateway example, SAN URI "
                                   f"{SPIFFE_PREFIX}NAME, clientAuth. The request's own subject and extensions "
                                   "are not copied: the CA decides what the certificate says.")
    p.add_argument("dir", metavar="DIR", type=Path, help="folder made by `gateway certs init`")
    p.add_argument("csr", metavar="CSR", type=Path, help="the integrator's certificate request")
    _client_options(p)

    p = sub.add_parser("revoke", help="revoke a client certificate and rewrite DIR/crl.pem",
                       description="Add DIR/clients/NAME.crt's serial to DIR/crl.pem and re-sign it. A running "
                                   "gateway picks it up within reload.watch_s (or on SIGHUP).")
    p.add_argument("dir", metavar="DIR", type=Path, help="folder made by `gateway certs init`")
    p.add_argument("name", metavar="NAME", help="client name, as in DIR/clients/NAME.crt")
    p.add_argument("--serial", metavar="HEX", type=_hex,
                   help="revoke NAME's certificate of this serial instead of the current one (e.g. one that "
                        "issue/sign --force moved aside)")
    return certs


def _hex(text: str) -> int:
    try:
        return int(text.removeprefix("0x"), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal serial") from None


def _client_options(p: argparse.ArgumentParser) -> None:
    """NAME, --days and --force: what issue and sign share."""
    p.add_argument("name", metavar="NAME", help="client name: the certificate's CN")
    p.add_argument("--days", metavar="N", type=int, default=DEFAULT_ISSUE_DAYS,
                   help=f"validity in days (default {DEFAULT_ISSUE_DAYS}; never past the CA's end)")
    p.add_argument("--force", action="store_true",
                   help="move an earlier NAME's files aside (NAME.crt.<serial>), e.g. after a revoke")


def _revocation_options(p: argparse.ArgumentParser) -> None:
    """--ocsp-url and --crl-url: where a relying party asks whether a client certificate is revoked."""
    p.add_argument("--ocsp-url", metavar="URL",
                   help="put this OCSP responder (http://...) into the client certificates' AuthorityInformationAccess")
    p.add_argument("--crl-url", metavar="URL",
                   help="put this CRL address (http://...) into the client certificates' CRLDistributionPoints")


def cli_main(args: argparse.Namespace) -> int:
    """Run `gateway certs ...` from parsed arguments; 0 on success, 1 with a one-line error."""
    try:
        if args.certs_command == "init":
            init(args.dir, args.client, args.days, ocsp_url=args.ocsp_url, crl_url=args.crl_url)
            who = f" and {len(args.client)} client(s): {', '.join(args.client)}" if args.client else ""
            print(f"wrote a development PKI to {args.dir}: CA, server (localhost){who}, empty crl.pem")
        elif args.certs_command == "issue":
            earlier = _still_valid_earlier(Path(args.dir), args.name) if args.force else None
            path = issue(args.dir, args.name, args.days, args.force, ocsp_url=args.ocsp_url, crl_url=args.crl_url)
            print(f"wrote {path} and {path.with_suffix('.key')}")
        elif args.certs_command == "sign":
            earlier = _still_valid_earlier(Path(args.dir), args.name) if args.force else None
            path, cert, csr = sign(args.dir, args.csr, args.name, args.days, args.force)
            asked = csr.subject.rfc4514_string()
            note = f" (the request asked for {asked!r})" if asked != cert.subject.rfc4514_string() else ""
            print(f"wrote {path}: {cert.subject.rfc4514_string()}{note}, serial {cert.serial_number:#x}, "
                  f"valid until {cert.not_valid_after_utc:%Y-%m-%d}; the private key stays with its holder")
        elif args.certs_command == "revoke":
            serial, changed = _revoke(Path(args.dir), args.name, args.serial)
            crl = Path(args.dir) / "crl.pem"
            if changed:
                print(f"revoked {args.name} (serial {serial:#x}); wrote {crl}")
            else:
                print(f"{args.name} (serial {serial:#x}) was already revoked; {crl} unchanged")
        else:  # pragma: no cover - argparse requires one of the above
            raise PKIError(f"unknown certs command {args.certs_command!r}")
        if args.certs_command in ("issue", "sign") and earlier:
            print(earlier)
    except PKIError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0  # an OSError (a folder it cannot write, say) is gateway's main's to put on one line
