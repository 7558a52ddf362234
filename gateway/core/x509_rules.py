"""The RFC 5280 encoding rules OpenSSL's strict mode enforces, read with `cryptography`.

`tls.x509_strict: true` makes OpenSSL refuse certificates that break them
(VERIFY_X509_STRICT). Many working CAs do: `openssl req -x509` leaves out
keyUsage, easy-rsa does not mark basicConstraints critical, old tools omit
the key identifiers. nginx, Envoy and HAProxy accept them, and so does the
gateway by default; `gateway check` names the rules a CA breaks, so that an
operator knows before turning strict mode on. Pure: certificates in, text out.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtensionOID


def _ext(cert: x509.Certificate, oid) -> x509.Extension | None:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    if bc is not None:
        return bool(bc.value.ca)
    return cert.version == x509.Version.v1 and cert.subject == cert.issuer  # a v1 root


def broken_rules(cert: x509.Certificate, trust_anchor: bool = False) -> list[str]:
    """The strict-mode rules `cert` breaks (OpenSSL's verify error names), as OpenSSL checks them."""
    out = []
    ca = is_ca(cert)
    if cert.version == x509.Version.v1:
        if len(cert.extensions):
            out.append("extensions in a version 1 certificate (X509v3 is needed)")
        return out
    bc = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    ku = _ext(cert, ExtensionOID.KEY_USAGE)
    aki = _ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    ski = _ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    san = _ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if ca and bc is not None and not bc.critical:
        out.append("basicConstraints of a CA not marked critical")
    if ca and ku is None:
        out.append("CA without a keyUsage extension")
    if bc is not None and bc.value.path_length is not None:
        if not ca:
            out.append("pathLenConstraint in a certificate that is no CA")
        elif ku is not None and not ku.value.key_cert_sign:
            out.append("pathLenConstraint without keyUsage keyCertSign")
    if ku is not None and ku.value.key_cert_sign and not ca:
        out.append("keyUsage keyCertSign in a certificate that is no CA")
    if not len(cert.issuer):
        out.append("empty issuer name")
    if not len(cert.subject):
        if ca:
            out.append("empty subject name in a CA")
        if san is None or not san.critical:
            out.append("empty subject without a critical subjectAltName")
    if san is not None and not len(san.value):
        out.append("empty subjectAltName extension")
    if aki is not None and aki.critical:
        out.append("authorityKeyIdentifier marked critical")
    if ski is not None and ski.critical:
        out.append("subjectKeyIdentifier marked critical")
    if aki is None and not trust_anchor:
        out.append("no authorityKeyIdentifier")
    if ca and ski is None:
        out.append("CA without a subjectKeyIdentifier")
    return out
