"""OCSP (RFC 6960) without I/O: the request to send, where to send it, and what an answer means.

The shell fetches; this module only builds and judges bytes, with the time passed in, so that
every way a response can lie (a stranger's signature, a CA without the OCSP-signing purpose,
another certificate's status, a stale answer) is a plain unit test. Anything that does not
prove the certificate's status is "error", never "good": a caller that fails open on error
does so by its own choice, not because this module guessed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

_STATUS = {
    ocsp.OCSPCertStatus.GOOD: "good",
    ocsp.OCSPCertStatus.REVOKED: "revoked",
    ocsp.OCSPCertStatus.UNKNOWN: "unknown",
}


@dataclass(frozen=True)
class Answer:
    """What a response says about one certificate; `reason` is for logs, times are UNIX seconds."""

    status: str                       # "good" | "revoked" | "unknown" | "error"
    reason: str
    this_update: float | None = None
    next_update: float | None = None
    revoked_at: float | None = None


def _error(reason: str) -> Answer:
    return Answer("error", reason)


def request_der(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A DER OCSP request for `cert`. SHA-1 CertID: the one every responder matches (RFC 5019)."""
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    return req.public_bytes(serialization.Encoding.DER)


def _http(names) -> list[str]:
    # Only plain http: fetching OCSP or a CRL over https would need revocation checks of its own.
    return [n.value for n in names
            if isinstance(n, x509.UniformResourceIdentifier) and n.value.lower().startswith("http://")]


def responder_urls(cert: x509.Certificate) -> list[str]:
    """The http OCSP responder URLs of the certificate's AuthorityInformationAccess, in order."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return _http(d.access_location for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP)


def crl_urls(cert: x509.Certificate) -> list[str]:
    """The http URLs of the certificate's CRLDistributionPoints (fullName URIs), in order."""
    try:
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    return _http(n for point in cdp for n in (point.full_name or ()))


def _verify(public_key, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None) -> bool:
    """Whether `signature` over `data` verifies with `public_key` (RSA PKCS#1 v1.5, ECDSA, EdDSA)."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and algorithm is not None:
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and algorithm is not None:
            public_key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) and algorithm is None:
            public_key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _key_hash(cert: x509.Certificate) -> bytes:
    # SHA-1 of the subjectPublicKey bits: RFC 6960's ResponderID byKey, RFC 5280's key identifier method 1.
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _is_responder(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> tuple[x509.Certificate | None, str]:
    """The certificate whose key must have signed the response: the issuer itself, or a responder it
    delegated to (RFC 6960 4.2.2.2); None with the reason when neither is proven."""
    if _is_responder(resp, issuer):
        return issuer, "signed by the issuer"
    why = "signed by a responder that is neither the issuer nor a certificate in the response"
    for responder in (c for c in resp.certificates if _is_responder(resp, c)):
        why = _delegation_problem(responder, issuer, now)
        if why is None:
            return responder, "signed by a delegated responder"
    return None, why


def _delegation_problem(responder: x509.Certificate, issuer: x509.Certificate, now: float) -> str | None:
    """Why `responder` may not answer for `issuer`'s certificates, or None when it may."""
    try:
        responder.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return "signed by a responder certificate the issuer did not issue"
    try:
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = ()
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        return "signed by a certificate without the OCSP-signing purpose"
    if not responder.not_valid_before_utc.timestamp() <= now <= responder.not_valid_after_utc.timestamp():
        return "signed by a responder certificate outside its validity"
    return None


def _single(resp: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate):
    """The SingleResponse about this very certificate, its CertID hashed with the response's algorithm."""
    for single in resp.responses:
        try:
            ours = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, single.hash_algorithm).build()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if (single.serial_number, single.issuer_name_hash, single.issuer_key_hash) == \
                (cert.serial_number, ours.issuer_name_hash, ours.issuer_key_hash):
            return single
    return None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def _ts(when: dt.datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def check_response(der: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: float,
                   skew_s: float = 300) -> Answer:
    """Judge an OCSP response for `cert` (issued by `issuer`) at UNIX time `now`.

    "good"/"revoked"/"unknown" only when the response is successful, signed by the issuer or by a
    responder the issuer delegated to, names this certificate, and is current within `skew_s`
    (thisUpdate not ahead of now, nextUpdate not behind it); otherwise "error" with the reason.
    """
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        return _error(f"not an OCSP response: {_one_line(exc)}")
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return _error(f"responder answered {resp.response_status.name.lower()}")
    try:
        single = _single(resp, cert, issuer)
        if single is None:
            return _error("the response does not name this certificate")
        signer, why = _signer(resp, issuer, now)
        if signer is None:
            return _error(why)
        if not _verify(signer.public_key(), resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm):
            return _error(f"bad signature ({why})")
    except (ValueError, UnsupportedAlgorithm) as exc:  # an extension or algorithm cryptography cannot read
        return _error(f"unreadable response: {_one_line(exc)}")
    this_update, next_update = _ts(single.this_update_utc), _ts(single.next_update_utc)
    if this_update > now + skew_s:
        return _error("thisUpdate is in the future")
    if next_update is not None and next_update < now - skew_s:
        return _error("stale")
    status = _STATUS[single.certificate_status]
    revoked_at = _ts(single.revocation_time_utc) if status == "revoked" else None
    return Answer(status, why, this_update, next_update, revoked_at)
