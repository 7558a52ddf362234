"""`gateway reference-api` as a process: config file, data that survives a restart, clean errors."""

from __future__ import annotations

import hashlib
import json
import urllib.request

from conftest import ROOT, free_port, order_form, wait_http
from gateway.reference.documents import sample_pdf


def write_config(tmp_path, **reference) -> str:
    config = tmp_path / "config.yaml"
    ref = {"data_dir": "data/", "directory": str(ROOT / "directory.yaml"), "timezone": "Europe/Stockholm", **reference}
    config.write_text(json.dumps({"reference_api": ref}))  # JSON is YAML
    return str(config)


async def test_data_survives_a_restart(tmp_path, run_gateway, aiohttp_client):
    import aiohttp

    config = write_config(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = run_gateway("reference-api", "-c", config, "--listen", f"127.0.0.1:{port}")
    wait_http(base + "/healthz", proc)
    pdf = sample_pdf(10_000)
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/orders", data=order_form(upload=pdf)) as r:
            assert r.status == 200
            order_id = await r.text()
        async with s.post(f"{base}/workflow/orders/{order_id}/signers/0/sign") as r:
            assert await r.text() == "PENDING"
        async with s.get(f"{base}/orders/{order_id}") as r:
            before = await r.json()
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    assert (tmp_path / "data" / "reference.sqlite3").exists()

    proc = run_gateway("reference-api", "-c", config, "--listen", f"127.0.0.1:{port}")
    wait_http(base + "/healthz", proc)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/orders/{order_id}") as r:
            assert await r.json() == before
        async with s.post(f"{base}/workflow/orders/{order_id}/signers/1/sign") as r:
            assert await r.text() == "ACCEPTED"
        async with s.get(f"{base}/orders/{order_id}/document") as r:
            doc = await r.read()
    assert doc.startswith(pdf) and hashlib.sha256(doc).hexdigest() != hashlib.sha256(pdf).hexdigest()


def test_bad_config_is_one_line_without_traceback(tmp_path, run_gateway):
    config = tmp_path / "config.yaml"
    config.write_text("reference_api:\n  timezone: Mars/Olympus\n")
    proc = run_gateway("reference-api", "-c", str(config))
    assert proc.wait(timeout=20) == 1
    err = proc.stderr.read()
    assert "reference_api.timezone" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    config.write_text("reference_api:\n  colour: blue\n")
    proc = run_gateway("reference-api", "-c", str(config))
    assert proc.wait(timeout=20) == 1
    assert "reference_api.colour: unknown key" in proc.stderr.read()


def test_openapi_is_served(tmp_path, run_gateway):
    port = free_port()
    proc = run_gateway("reference-api", "-c", write_config(tmp_path), "--listen", f"127.0.0.1:{port}")
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.yaml") as resp:
        assert resp.headers["Content-Type"].startswith("application/yaml")
        assert b"openapi: 3.1" in resp.read()
