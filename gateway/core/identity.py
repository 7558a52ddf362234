"""Identity: what a verified client certificate says about its holder.

Read from the DER certificate that the TLS layer has already verified, with
`cryptography`; nothing here trusts a header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Identity:
    subject: str                  # RFC 4514
    common_name: str | None
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]
    san_email: tuple[str, ...]
    fingerprint_sha256: str       # "AB:CD:..." upper-case hex
    serial: str                   # hex
    issuer: str                   # RFC 4514
    not_before: datetime
    not_after: datetime

    def audit_fields(self) -> dict:
        return {
            "subject": self.subject, "issuer": self.issuer, "serial": self.serial,
            "fingerprint_sha256": self.fingerprint_sha256,
        }


def format_fingerprint(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def identity_from_der(der: bytes) -> Identity:
    """The identity of a certificate the handshake verified.

    A subjectAltName that cannot be read (RFC 5280 forbids an empty one, which OpenSSL
    accepts and cryptography 51 refuses to parse) gives no SANs: a policy that matches by
    SAN then does not match, and the subject, common name and fingerprint still can.
    """
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uri = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        email = tuple(san.get_values_for_type(x509.RFC822Name))
    except (x509.ExtensionNotFound, ValueError):
        dns = uri = email = ()
    return Identity(
        subject=cert.subject.rfc4514_string(),
        common_name=str(cns[0].value) if len(cns) == 1 else None,
        san_dns=dns, san_uri=uri, san_email=email,
        fingerprint_sha256=format_fingerprint(hashlib.sha256(der).digest()),
        serial=format(cert.serial_number, "x"),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
