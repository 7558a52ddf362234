"""The audit log through the gateway: a line for every request, chained; no service without it."""

from __future__ import annotations

import json
import shutil
import time

import aiohttp

from gateway.core.audit import verify
from gateway_harness import ORDER_CRM, ORDER_HR, POLICIES, gateway_running, session, write_config

FIELDS = {"ts", "request_id", "client", "cert", "remote", "method", "path", "operation", "order_id", "solicitor",
          "decision", "reason", "code", "status", "bytes_in", "bytes_out", "duration_ms", "prev", "hash"}


async def status_of(test_pki, client, method, url, **kwargs) -> tuple[int, str]:
    async with session(test_pki, test_pki.client(client)) as s:
        async with s.request(method, url, **kwargs) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Request-ID", "")


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_every_request_leaves_one_chained_line(tmp_path, test_pki, recorder_url):
    policies = {**POLICIES, "crm": {**POLICIES["crm"], "rate_limit": {"per_minute": 3, "burst": 3}}}
    config = write_config(tmp_path, test_pki, recorder_url, policies=policies)
    calls = [
        ("crm", "GET", f"/orders/{ORDER_CRM}/state", 200),
        ("crm", "GET", f"/orders/{ORDER_HR}/state", 404),       # another solicitor's order
        ("crm", "DELETE", f"/orders/{ORDER_CRM}", 403),         # not allowed (refusals count too)
        ("crm", "GET", f"/orders/{ORDER_CRM}/state", 429),      # burst 3 used up
        ("stranger", "GET", f"/orders/{ORDER_CRM}/state", 403),
        ("hr-system", "GET", "/no/such/path", 404),
    ]
    ids = []
    async with gateway_running(config) as (url, _):
        for client, method, path, expected in calls:
            status, request_id = await status_of(test_pki, client, method, url + path)
            assert status == expected, (client, path)
            ids.append(request_id)
    log = tmp_path / "data" / "audit.jsonl"
    records = read_log(log)
    assert [r["request_id"] for r in records] == ids
    assert [r["status"] for r in records] == [c[3] for c in calls]
    assert [r["decision"] for r in records] == ["allow", "deny", "deny", "deny", "deny", "deny"]
    for record in records:
        assert FIELDS <= set(record), FIELDS - set(record)
    first = records[0]
    assert first["client"] == "crm" and first["operation"] == "order_state" and first["order_id"] == ORDER_CRM
    assert first["cert"]["subject"] == "CN=crm,O=gateway example" and first["remote"] == "127.0.0.1"
    assert first["solicitor"] == {"source": "EXTERNAL", "identifier": "198603052385"}
    assert first["bytes_out"] == 2 and first["duration_ms"] > 0
    assert records[3]["reason"].startswith("rate limit")
    assert [r["code"] for r in records] == [None, "order_not_visible", "operation_not_allowed", "rate_limited",
                                            "unknown_client", "no_operation"]
    assert records[4]["client"] == "unknown" and records[4]["cert"]["subject"] == "CN=stranger,O=gateway example"
    with open(log, "rb") as f:
        assert verify(f, None).ok


async def test_refused_requests_count_against_the_client_limit(tmp_path, test_pki, recorder_url, recorder):
    """403s and 404s are not free: past the client's burst they are 429, however they would have ended."""
    policies = {"crm": {**POLICIES["crm"], "rate_limit": {
        "per_minute": 3, "burst": 3, "operations": {"order_state": {"per_minute": 1, "burst": 1}}}}}
    config = write_config(tmp_path, test_pki, recorder_url, policies=policies)
    refused = [("DELETE", f"/orders/{ORDER_CRM}"), ("GET", f"/orders/{ORDER_HR}/state"), ("GET", "/nowhere")] * 4
    async with gateway_running(config) as (url, _):
        statuses, retry = [], []
        async with session(test_pki, test_pki.client("crm")) as s:
            for method, path in refused:
                async with s.request(method, url + path) as resp:
                    await resp.read()
                    statuses.append(resp.status)
                    retry.append(resp.headers.get("Retry-After"))
    assert statuses[:3] == [403, 404, 404] and statuses[3:] == [429] * 9
    assert all(r is not None and int(r) >= 1 for r in retry[3:])
    # the one order_state call was a look-up refused as 404: the operation's own limit counts admitted
    # operations, the client's limit every request
    assert [r.path for r in recorder.seen] == [f"/orders/{ORDER_HR}"]
    records = read_log(tmp_path / "data" / "audit.jsonl")
    assert [r["status"] for r in records] == statuses


async def test_certificates_of_no_policy_share_one_bound(tmp_path, test_pki, recorder_url):
    from gateway.core.ratelimit import UNMAPPED

    config = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]})
    async with gateway_running(config) as (url, _):
        statuses = []
        async with session(test_pki, test_pki.client("stranger")) as s:
            for _ in range(UNMAPPED.burst + 5):
                async with s.get(f"{url}/orders/{ORDER_CRM}/state") as resp:
                    await resp.read()
                    statuses.append(resp.status)
        # the known clients keep their own limits
        assert (await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state"))[0] == 200
    assert statuses[:UNMAPPED.burst] == [403] * UNMAPPED.burst
    assert set(statuses[UNMAPPED.burst:]) == {429}


async def test_a_refusal_is_answered_and_audited_when_counting_it_fails(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]})
    async with gateway_running(config) as (url, running):
        async def broken(cells):
            raise ValueError("a reply the storage could not read")

        running.gateway.limiter.check = broken
        status, request_id = await status_of(test_pki, "crm", "DELETE", f"{url}/orders/{ORDER_CRM}")
    assert status == 403
    (line,) = read_log(tmp_path / "data" / "audit.jsonl")
    assert (line["request_id"], line["status"], line["code"]) == (request_id, 403, "operation_not_allowed")


async def test_chain_continues_across_restarts_with_a_key(tmp_path, test_pki, recorder_url):
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(b"0123456789abcdef0123456789abcdef")
    config = write_config(tmp_path, test_pki, recorder_url,
                          audit={"path": "data/audit.jsonl", "key_file": str(key_file)})
    for _ in range(2):
        async with gateway_running(config) as (url, _):
            assert (await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state"))[0] == 200
    with open(tmp_path / "data" / "audit.jsonl", "rb") as f:
        result = verify(f, key_file.read_bytes())
    assert result.ok and result.records == 2


async def test_redacted_fields_are_keyed_hashes(tmp_path, test_pki, recorder_url):
    config = write_config(tmp_path, test_pki, recorder_url,
                          audit={"path": "data/audit.jsonl", "redact": ["solicitor.identifier", "cert.subject"]})
    async with gateway_running(config) as (url, _):
        for _ in range(2):
            await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state")
    text = (tmp_path / "data" / "audit.jsonl").read_text()
    assert "198603052385" not in text and "CN=crm" not in text
    one, two = read_log(tmp_path / "data" / "audit.jsonl")
    assert one["solicitor"]["identifier"] == two["solicitor"]["identifier"]
    assert one["solicitor"]["identifier"].startswith("hmac-sha256:")
    assert one["cert"]["issuer"] == "CN=gateway example CA,O=gateway example"


async def test_a_redacted_value_is_nowhere_in_the_line(tmp_path, test_pki, recorder_url, recorder):
    """A refused create_order names the solicitor in its reason: redacted there too, to the same pseudonym."""
    config = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]},
                          audit={"path": "data/audit.jsonl", "redact": ["solicitor.identifier"]})
    secret = "sAMAccountName=kept.secret"
    form = aiohttp.FormData()
    form.add_field("solicitor", json.dumps({"source": "INTERNAL", "identifier": secret}))
    form.add_field("file", b"%PDF-1.4", filename="a.pdf", content_type="application/pdf")
    async with gateway_running(config) as (url, _):
        assert (await status_of(test_pki, "crm", "POST", f"{url}/orders", data=form))[0] == 403
    text = (tmp_path / "data" / "audit.jsonl").read_text()
    assert secret not in text and "kept.secret" not in text
    (line,) = read_log(tmp_path / "data" / "audit.jsonl")
    pseudonym = line["solicitor"]["identifier"]
    assert pseudonym.startswith("hmac-sha256:") and pseudonym in line["reason"]
    assert line["code"] == "solicitor_not_allowed" and recorder.seen == []


async def admin_ready(config_path) -> tuple[int, dict]:
    from gateway.shell.settings import load_config

    admin = load_config(config_path).admin
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin.port}/readyz") as resp:
            return resp.status, await resp.json()


async def until_503(test_pki, url, tries=50, answered_before=False) -> int:
    """Send requests until the gateway refuses to serve un-audited (bounded).

    A request forwarded before the writer knew the log was broken is never answered (its line
    could not be written): the connection is closed instead. No 200 leaves without its line.
    """
    for i in range(tries):
        try:
            status, _ = await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state")
        except aiohttp.ServerDisconnectedError:
            continue
        if status == 503:
            return i
        assert answered_before and status == 200, status
    raise AssertionError("the gateway kept serving while its audit log could not be written")


async def test_disk_full_means_503_and_not_ready(tmp_path, test_pki, recorder_url, recorder):
    config = write_config(tmp_path, test_pki, recorder_url, audit={"path": "/dev/full"})
    async with gateway_running(config) as (url, _):
        await until_503(test_pki, url)
        forwarded = len(recorder.seen)
        status, body = await admin_ready(config)
        assert status == 503 and "No space left" in body["problems"]["audit"]
        async with session(test_pki, test_pki.client("crm")) as s:
            async with s.get(f"{url}/orders/{ORDER_CRM}/state") as resp:
                problem = await resp.json(content_type=None)
                assert resp.status == 503 and resp.content_type == "application/problem+json"
        assert "audit" in problem["detail"]
        assert len(recorder.seen) == forwarded  # nothing more was forwarded


async def test_unusable_folder_at_start_means_503(tmp_path, test_pki, recorder_url, recorder):
    (tmp_path / "a-file").write_text("not a folder")
    config = write_config(tmp_path, test_pki, recorder_url, audit={"path": str(tmp_path / "a-file" / "audit.jsonl")})
    async with gateway_running(config) as (url, _):
        status, _ = await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state")
        assert status == 503 and recorder.seen == []
        status, body = await admin_ready(config)
        assert status == 503 and "a-file" in body["problems"]["audit"]


async def test_folder_removed_while_running_means_503_then_recovers(tmp_path, test_pki, recorder_url):
    folder = tmp_path / "logs"
    config = write_config(tmp_path, test_pki, recorder_url, audit={"path": str(folder / "audit.jsonl")})
    async with gateway_running(config) as (url, _):
        assert (await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state"))[0] == 200
        shutil.rmtree(folder)
        await until_503(test_pki, url)
        folder.mkdir()  # the operator repairs it: the writer reopens the log and serving resumes
        deadline = time.monotonic() + 10
        while (await admin_ready(config))[0] != 200:
            assert time.monotonic() < deadline, "the gateway did not recover"
            await __import__("asyncio").sleep(0.1)
        assert (await status_of(test_pki, "crm", "GET", f"{url}/orders/{ORDER_CRM}/state"))[0] == 200
    records = read_log(folder / "audit.jsonl")
    assert records[-1]["status"] == 200
