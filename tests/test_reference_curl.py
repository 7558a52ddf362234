"""The vendor document's curl examples, run with the real curl binary against the reference API."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

import vendor_examples as ex
from conftest import ROOT, need_programs
from gateway.reference.documents import sample_pdf

need_programs("curl")
SEED = ROOT.parent / "shared" / "seed" / "automation-api.txt"


async def sh(command: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, out, err


@pytest.mark.skipif(not SEED.exists(), reason="the vendor document is not beside this checkout")
def test_examples_are_the_vendor_documents():
    text = SEED.read_text(encoding="utf-8").replace("\u00a0", " ")
    assert ex.CREATE in text
    assert ex.READ in text


async def test_vendor_create_example_verbatim(ref_server, clock, tmp_path):
    # The example's dueDate is 2024-12-24: run it on a clock that is still before that day.
    clock.now = 1704067200  # 2024-01-01T00:00:00Z
    pdf = tmp_path / "signthisplease.pdf"
    pdf.write_bytes(sample_pdf(20_000))
    base = f"http://127.0.0.1:{ref_server.port}"
    code, out, err = await sh(ex.fill(ex.CREATE, f"{base}/orders", str(pdf)))
    assert code == 0, err.decode()
    assert b"< HTTP/1.1 200" in err
    order_id = out.decode()
    assert len(order_id) == 36 and order_id.count("-") == 4

    code, out, _ = await sh(ex.fill(ex.STATE, f"{base}/orders/{order_id}/state"))
    assert (code, out) == (0, b"PENDING")
    code, out, _ = await sh(ex.fill(ex.READ, f"{base}/orders/{order_id}"))
    assert code == 0 and b'"identifier": "198603052385"' in out and b"Andersson" in out
    download = tmp_path / "out.pdf"
    code, _, _ = await sh(ex.fill(ex.DOCUMENT, f"{base}/orders/{order_id}/document") + f" -o {download}")
    assert code == 0
    assert hashlib.sha256(download.read_bytes()).digest() == hashlib.sha256(pdf.read_bytes()).digest()

    # The same example on today's clock: the dueDate is in the past, a 400 naming it.
    clock.now = 1795000000  # 2026-11-18
    code, out, err = await sh(ex.fill(ex.CREATE, f"{base}/orders", str(pdf)))
    assert b"< HTTP/1.1 400" in err and b"dueDate" in out


async def test_anonymize_with_curl_form(ref_server, clock):
    base = f"http://127.0.0.1:{ref_server.port}"
    code, out, err = await sh(f"curl -s -w '%{{http_code}}' -X POST {base}/anonymize -F 'externalId=EXTERNAL:200001011907'")
    assert out.endswith(b"404")  # nobody with that number has an order yet
