"""`gateway serve` as a process, on the embedded reference API, driven by the real curl."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

import vendor_examples as ex
from conftest import need_programs, wait_http
from gateway.shell.settings import load_config
from gateway.reference.documents import sample_pdf
from gateway_harness import POLICIES, write_config

need_programs("curl")


@pytest.fixture
def served(tmp_path, test_pki, run_gateway):
    """`gateway serve -c CONFIG` with the embedded reference API and identity tokens on."""
    policies = {k: POLICIES[k] for k in ("hr-system", "crm")}
    config_path = write_config(tmp_path, test_pki, "embedded", policies=policies,
                               identity_token={"key": "data/token.key", "audience": "automation-api"})
    config = load_config(config_path)
    proc = run_gateway("serve", "-c", str(config_path))
    wait_http(f"http://127.0.0.1:{config.admin.port}/healthz", proc, deadline_s=40)
    return config, proc


async def curl(test_pki, client: str, command: str) -> tuple[int, str, str]:
    crt, key = test_pki.client(client)
    command = command.replace("curl ", f"curl -sS --cacert {test_pki.ca} --cert {crt} --key {key} ", 1)
    proc = await asyncio.create_subprocess_exec("bash", "-c", command, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, out.decode(), err.decode()


async def test_vendor_examples_through_the_gateway(served, test_pki, tmp_path):
    config, _ = served
    base = f"https://localhost:{config.listen.port}"
    pdf = tmp_path / "signthisplease.pdf"
    pdf.write_bytes(sample_pdf(50_000))

    # The create example as the vendor wrote it: its dueDate (2024-12-24) has passed, which the upstream
    # answers with a 400 naming dueDate; the gateway let it through because the solicitor is hr-system's.
    code, out, err = await curl(test_pki, "hr-system", ex.fill(ex.CREATE, f"{base}/orders", str(pdf)))
    assert code == 0, err
    assert "< HTTP/1.1 400" in err and "dueDate" in out
    # The same with a due date still ahead: a new order.
    create = ex.fill(ex.CREATE, f"{base}/orders", str(pdf)).replace("2024-12-24T00:00:00", "2099-12-24T00:00:00")
    code, order_id, err = await curl(test_pki, "hr-system", create)
    assert code == 0 and "< HTTP/1.1 200" in err, err
    assert len(order_id) == 36

    code, out, _ = await curl(test_pki, "hr-system", ex.fill(ex.STATE, f"{base}/orders/{order_id}/state"))
    assert out == "PENDING"
    code, out, _ = await curl(test_pki, "hr-system", ex.fill(ex.READ, f"{base}/orders/{order_id}"))
    assert json.loads(out)["solicitor"]["identifier"] == "sAMAccountName=cborgstrom"
    download = tmp_path / "back.pdf"
    code, _, _ = await curl(test_pki, "hr-system", ex.fill(ex.DOCUMENT, f"{base}/orders/{order_id}/document")
                            + f" -o {download}")
    assert download.read_bytes() == pdf.read_bytes()

    # crm's solicitors are EXTERNAL only: hr-system's order does not exist for it, and it may not create one.
    code, out, _ = await curl(test_pki, "crm", ex.fill(ex.STATE, f"{base}/orders/{order_id}/state"))
    assert json.loads(out)["status"] == 404
    code, out, _ = await curl(test_pki, "crm", create)
    assert json.loads(out)["status"] == 403

    code, out, _ = await curl(test_pki, "hr-system", f"curl -X DELETE -w '%{{http_code}}' {base}/orders/{order_id}")
    assert out == "204"
    code, out, _ = await curl(test_pki, "hr-system", ex.fill(ex.STATE, f"{base}/orders/{order_id}/state"))
    assert json.loads(out)["status"] == 404

    # the audit answers "who created order X", and names each refusal by its fixed code
    records = [r for r in map(json.loads, config.audit.path.read_bytes().splitlines()) if "event" not in r]
    created = [r for r in records if r["operation"] == "create_order" and r["status"] == 200]
    assert [(r["client"], r["order_id"], r["code"]) for r in created] == [("hr-system", order_id, None)]
    assert [r["order_id"] for r in records if r["operation"] == "create_order" and r["status"] != 200] == [None] * 2
    codes = [(r["client"], r["status"], r["code"]) for r in records if r["decision"] == "deny"]
    assert ("crm", 404, "order_not_visible") in codes and ("crm", 403, "solicitor_not_allowed") in codes


def test_embedded_api_refuses_calls_around_the_gateway(served):
    config, _ = served
    ref = f"http://{config.reference_api.listen}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{ref}/orders/5d7c2010-f461-4ceb-b66c-d6ef2a9a2802/state")
    assert info.value.code == 401
    assert json.loads(info.value.read())["detail"] == "an identity token is required"
    request = urllib.request.Request(f"{ref}/orders/5d7c2010-f461-4ceb-b66c-d6ef2a9a2802/state",
                                     headers={"X-Identity-Token": "forged.token.value"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 401


def test_sigterm_stops_gateway_and_embedded_api(served):
    config, proc = served
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    assert proc.stderr.read() == ""  # no dependency warnings, from the gateway or its embedded API
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{config.reference_api.listen}/healthz", timeout=2)


@pytest.mark.parametrize("policy, key", [
    ({"client": "x", "match": {"subject": "CN=x"}, "allow": ["fly"]}, "allow[0]"),
    ({"client": "x", "match": {"colour": "blue"}, "allow": []}, "match.colour"),
    ({"client": "x", "match": {"subject": "CN=x"}, "allow": ["read_order"]}, "solicitors"),
])
def test_invalid_policy_stops_serve_with_one_line(tmp_path, test_pki, run_gateway, policy, key):
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9", policies={"bad": policy})
    proc = run_gateway("serve", "-c", str(config))
    assert proc.wait(timeout=30) == 1
    err = proc.stderr.read().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "bad.yaml" in err and key in err


async def test_embedded_data_is_private_and_no_answer_names_versions(served, test_pki, tmp_path):
    """The reference API's SQLite files hold names, phones and e-mails: 0700 folder, 0600 files."""
    import stat

    config, _ = served
    base = f"https://localhost:{config.listen.port}"
    pdf = tmp_path / "signthisplease.pdf"
    pdf.write_bytes(sample_pdf(1_000))
    create = ex.fill(ex.CREATE, f"{base}/orders", str(pdf)).replace("2024-12-24T00:00:00", "2099-12-24T00:00:00")
    code, order_id, err = await curl(test_pki, "hr-system", create)
    assert code == 0 and "< HTTP/1.1 200" in err, err
    data = config.reference_api.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    own = list(data.iterdir())  # the reference API's, and the gateway's audit log and keys beside them
    assert {p.name for p in own} >= {"reference.sqlite3", "reference.sqlite3-wal", "signing.key", "signing.crt",
                                     "audit.jsonl", "token.key"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in own} == {p.name: oct(0o600) for p in own}

    # No answer names its software: the front door (forwarded and refused), and the reference API itself.
    _, _, err = await curl(test_pki, "hr-system", f"curl -v {base}/orders/{order_id}/state")
    _, _, refused = await curl(test_pki, "crm", f"curl -v {base}/orders/{order_id}/state")
    direct = urllib.request.Request(f"http://{config.reference_api.listen}/healthz")
    with urllib.request.urlopen(direct) as resp:
        ref_server = resp.headers.get_all("Server") or []
    servers = [line for line in (err + refused).splitlines() if line.lower().startswith("< server:")]
    assert len(servers) == 2 and ref_server
    assert all(not any(c.isdigit() for c in s) and "aiohttp" not in s.lower() for s in servers + ref_server)


def test_what_start_up_built_is_out_of_the_collectors_sight():
    """settle_heap: a full collection walks only what serving created, not the start-up's objects."""
    import gc

    from gateway.runtime.lifecycle import settle_heap

    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000 and len(gc.get_objects(2)) < gc.get_freeze_count() / 10
    finally:
        gc.unfreeze()
