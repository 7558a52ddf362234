"""Reload without a signal: file changes (symlink swaps too) reload as SIGHUP does; config.yaml is re-read."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest

from gateway.shell import oplog
from gateway.tools import certs
from gateway_harness import ORDER_CRM, POLICIES, PKIFolder, gateway_running, session, write_config
from test_gateway_metrics import scrape, value

STATE = f"/orders/{ORDER_CRM}/state"


async def until(condition, deadline_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + deadline_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} not reached within {deadline_s}s"
        await asyncio.sleep(0.05)


async def status(test_pki, client: str, url: str) -> int | None:
    try:
        async with session(test_pki, test_pki.client(client)) as s:
            async with s.get(url + STATE) as resp:
                await resp.read()
                return resp.status
    except (aiohttp.ClientError, ConnectionError):
        return None  # refused in the handshake


@pytest.fixture
def own_pki(tmp_path) -> PKIFolder:
    certs.init(tmp_path / "pki", ["crm", "newcomer"])
    return PKIFolder(tmp_path / "pki")


def watched_config(tmp_path, own_pki, recorder_url, watch_s: float = 0.1):
    """The CRL behind a symlink, as cert-manager and Vault agent publish files."""
    (own_pki.dir / "crl-1.pem").write_bytes((own_pki.dir / "crl.pem").read_bytes())
    (tmp_path / "crl-live.pem").symlink_to(own_pki.dir / "crl-1.pem")
    tls = {"cert": str(own_pki.dir / "server.crt"), "key": str(own_pki.dir / "server.key"),
           "client_ca": str(own_pki.ca), "crl": str(tmp_path / "crl-live.pem")}
    return write_config(tmp_path, own_pki, recorder_url, policies={"crm": POLICIES["crm"]}, tls=tls,
                        reload={"watch_s": watch_s})


def swap_symlink(link, target) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic: readers see the old file or the new one


async def test_a_crl_swapped_in_by_symlink_is_picked_up(tmp_path, own_pki, recorder_url):
    config = watched_config(tmp_path, own_pki, recorder_url)
    async with gateway_running(config) as (url, running):
        assert await status(own_pki, "crm", url) == 200
        certs.revoke(own_pki.dir, "crm")  # rewrites pki/crl.pem; the live CRL is still crl-1.pem
        (own_pki.dir / "crl-2.pem").write_bytes((own_pki.dir / "crl.pem").read_bytes())
        swap_symlink(tmp_path / "crl-live.pem", own_pki.dir / "crl-2.pem")

        async def refused() -> bool:
            return await status(own_pki, "crm", url) is None

        await until(refused, what="the revoked client refused after the symlink swap")
        families = await scrape(running.config.admin)
    assert value(families, "gateway_config_reloads_total", result="ok") == 1


async def test_a_new_policy_file_is_picked_up(tmp_path, own_pki, recorder_url):
    config = watched_config(tmp_path, own_pki, recorder_url)
    async with gateway_running(config) as (url, _):
        assert await status(own_pki, "newcomer", url) == 403

        newcomer = {**POLICIES["crm"], "client": "newcomer", "match": {"common_name": "newcomer"}}
        (tmp_path / "policies" / "newcomer.yaml").write_text(json.dumps(newcomer))

        async def mapped() -> bool:
            return await status(own_pki, "newcomer", url) == 200

        await until(mapped, what="the new policy in force")


async def test_config_yaml_is_reread_and_restart_keys_are_named(tmp_path, own_pki, recorder_url, capsys):
    config = watched_config(tmp_path, own_pki, recorder_url)
    async with gateway_running(config) as (url, running):
        data = json.loads(config.read_text())
        old_port = data["listen"]["port"]
        data["limits"]["max_body_bytes"] = 4096
        data["listen"]["port"] = old_port + 1
        config.write_text(json.dumps(data))

        async def applied() -> bool:
            return running.gateway.config.limits.max_body_bytes == 4096

        await until(applied, what="limits.max_body_bytes applied")
        assert running.config.listen.port == old_port  # not applied: still served where it was
        assert await status(own_pki, "crm", url) == 200
    oplog.drain()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    reloads = [e for e in events if e["event"] == "reload"]
    assert reloads[-1]["result"] == "ok" and reloads[-1]["applied"] == ["limits.max_body_bytes"]
    needs = [e for e in events if e["event"] == "reload_needs_restart"]
    assert needs and needs[-1]["keys"] == ["listen.port"]


async def test_a_broken_file_keeps_the_running_configuration_and_is_not_retried(tmp_path, own_pki, recorder_url):
    config = watched_config(tmp_path, own_pki, recorder_url)
    async with gateway_running(config) as (url, running):
        (tmp_path / "policies" / "crm.yaml").write_text("client: [not, a, name]\n")

        async def failed_once() -> bool:
            families = await scrape(running.config.admin)
            return value(families, "gateway_config_reloads_total", result="error") == 1

        await until(failed_once, what="a failed reload")
        assert await status(own_pki, "crm", url) == 200  # the running policies are kept
        await asyncio.sleep(0.5)  # several watch periods with nothing new on disk
        families = await scrape(running.config.admin)
        assert value(families, "gateway_config_reloads_total", result="error") == 1


async def test_watch_zero_means_sighup_only(tmp_path, own_pki, recorder_url):
    config = watched_config(tmp_path, own_pki, recorder_url, watch_s=0)
    async with gateway_running(config) as (url, running):
        certs.revoke(own_pki.dir, "crm")
        (own_pki.dir / "crl-2.pem").write_bytes((own_pki.dir / "crl.pem").read_bytes())
        swap_symlink(tmp_path / "crl-live.pem", own_pki.dir / "crl-2.pem")
        await asyncio.sleep(0.6)  # several times what a watcher at 0.1 s would need: nothing may happen
        assert await status(own_pki, "crm", url) == 200
        from gateway.runtime.lifecycle import reload

        assert reload(running)
        assert await status(own_pki, "crm", url) is None
