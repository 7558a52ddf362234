"""PDF documents: the upload check, the reference API's signing key, PAdES signing.

Signatures are added incrementally with pyHanko, one per signer, so earlier
signatures stay valid and the document remains verifiable with any PDF tool.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

with warnings.catch_warnings():
    # pyHanko imports cryptography's DSA, which cryptography 51 deprecates: a warning for pyHanko's
    # developers that would otherwise reach whoever imports this module.
    warnings.filterwarnings("ignore", message="DSA is deprecated", category=UserWarning)
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.misc import PdfError
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign import fields, signers
    from pyhanko_certvalidator.registry import SimpleCertificateStore

PDF_MAGIC = b"%PDF-"


class DocumentError(Exception):
    """The upload is not a PDF we can accept and sign (HTTP 400)."""


def check_pdf(data: bytes) -> int:
    """Parse the upload as a PDF; return its page count or raise DocumentError."""
    if not data:
        raise DocumentError("is empty")
    if not data[:1024].lstrip().startswith(PDF_MAGIC):
        raise DocumentError("is not a PDF document")
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False)
        if reader.encrypted:
            raise DocumentError("is an encrypted PDF, which cannot be signed")
        pages = int(reader.root["/Pages"]["/Count"])
    except DocumentError:
        raise
    except (PdfError, KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as exc:
        raise DocumentError(f"is not a PDF that parses ({type(exc).__name__})") from None
    if pages < 1:
        raise DocumentError("is a PDF without pages")
    return pages


@dataclass(frozen=True)
class SigningIdentity:
    """The reference API's own document-signing certificate and key."""

    cert_path: Path
    key_path: Path

    @classmethod
    def load_or_create(cls, data_dir: Path, cert: Path | None = None, key: Path | None = None) -> "SigningIdentity":
        """Use the configured pair, else the pair in data_dir, created on first start."""
        if cert and key:
            return cls(Path(cert), Path(key))
        cert_path, key_path = data_dir / "signing.crt", data_dir / "signing.key"
        if not (cert_path.exists() and key_path.exists()):
            _create_signing_pair(cert_path, key_path)
        return cls(cert_path, key_path)

    def signer(self) -> signers.SimpleSigner:
        cert = asn1_x509.Certificate.load(
            x509.load_pem_x509_certificate(self.cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
        )
        private = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        key_der = private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return signers.SimpleSigner(
            signing_cert=cert,
            signing_key=asn1_keys.PrivateKeyInfo.load(key_der),
            cert_registry=SimpleCertificateStore.from_certs([cert]),
        )


def _create_signing_pair(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "Signing Workflow reference API"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway reference implementation"),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
    fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def sign_pdf(data: bytes, signer: signers.SimpleSigner, field_name: str, name: str, reason: str) -> bytes:
    """Append one PAdES signature to `data` as an incremental update."""
    writer = IncrementalPdfFileWriter(io.BytesIO(data), strict=False)
    meta = signers.PdfSignatureMetadata(
        field_name=field_name,
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        name=name,
        reason=reason,
    )
    out = signers.sign_pdf(writer, meta, signer=signer)
    return out.getvalue()


def sample_pdf(min_size: int = 0, text: str = "Please sign this document.") -> bytes:
    """A small valid one-page PDF, padded to at least `min_size` bytes (tests, benchmarks, examples)."""
    safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    content = f"BT /F1 18 Tf 72 720 Td ({safe}) Tj ET\n".encode()
    padding = max(0, min_size - 700)
    if padding:  # a PDF comment line per 100 bytes keeps the file a valid, plain PDF
        content += b"".join(b"%" + b"x" * 98 + b"\n" for _ in range(padding // 100 + 1))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
