"""ACCEPTED documents carry one PAdES signature per signer, valid under pyHanko's validator."""

from __future__ import annotations

import io

from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from conftest import SIGNER_EXTERNAL, create_order
from gateway.reference.documents import sample_pdf

SIGNER_JANE = '{"source":"INTERNAL","identifier":"sAMAccountName=jane.doe"}'


def trust(settings) -> ValidationContext:
    _, _, der = pem.unarmor(settings.signing.cert_path.read_bytes())
    return ValidationContext(trust_roots=[asn1_x509.Certificate.load(der)])


async def test_every_signer_adds_a_valid_pades_signature(ref, ref_settings):
    original = sample_pdf(30_000)
    order_id = await create_order(ref, upload=original, signers=[SIGNER_EXTERNAL, SIGNER_JANE, SIGNER_EXTERNAL])
    for index in (2, 0, 1):
        resp = await ref.post(f"/workflow/orders/{order_id}/signers/{index}/sign")
        assert resp.status == 200
    assert await (await ref.get(f"/orders/{order_id}/state")).text() == "ACCEPTED"
    signed = await (await ref.get(f"/orders/{order_id}/document")).read()

    assert signed.startswith(original)  # incremental: the original bytes are untouched
    reader = PdfFileReader(io.BytesIO(signed))
    sigs = reader.embedded_signatures
    assert [s.field_name for s in sigs] == ["Signer3", "Signer1", "Signer2"]
    names = []
    for sig in sigs:
        status = await async_validate_pdf_signature(sig, trust(ref_settings))
        assert status.intact and status.valid and status.trusted, status.pretty_print_details()
        assert status.bottom_line
        assert sig.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"  # PAdES
        names.append(str(sig.sig_object["/Name"]))
    assert names == ["Anna Andersson", "Anna Andersson", "Jane Doe"]


async def test_signature_does_not_validate_against_another_key(ref, ref_settings, tmp_path):
    from gateway.reference.documents import SigningIdentity

    order_id = await create_order(ref, signers=[SIGNER_EXTERNAL])
    await ref.post(f"/workflow/orders/{order_id}/signers/0/sign")
    signed = await (await ref.get(f"/orders/{order_id}/document")).read()
    other = SigningIdentity.load_or_create(tmp_path / "other")
    _, _, der = pem.unarmor(other.cert_path.read_bytes())
    (sig,) = PdfFileReader(io.BytesIO(signed)).embedded_signatures
    status = await async_validate_pdf_signature(sig, ValidationContext(trust_roots=[asn1_x509.Certificate.load(der)]))
    assert status.intact and not status.trusted and not status.bottom_line


async def test_signing_key_is_created_once_and_kept_private(ref_settings):
    from gateway.reference.documents import SigningIdentity

    key = ref_settings.signing.key_path
    assert key.stat().st_mode & 0o077 == 0
    again = SigningIdentity.load_or_create(ref_settings.data_dir)
    assert again.cert_path.read_bytes() == ref_settings.signing.cert_path.read_bytes()
