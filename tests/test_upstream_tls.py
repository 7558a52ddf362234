"""TLS to an https:// upstream (upstream.ca, .cert, .key, .server_name): a real TLS upstream on a loopback
port, requests through the real gateway over mTLS, and what the client, the operational log, /readyz and
`gateway check` say when the upstream cannot be verified or refuses the gateway."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import gateway_command
from cryptography.hazmat.primitives import serialization
from gateway_harness import (
    ORDER_CRM,
    POLICIES,
    RecordingUpstream,
    gateway_running,
    session,
    write_config,
)

from gateway.core.errors import SettingsError
from gateway.runtime import lifecycle
from gateway.shell import oplog
from gateway.shell.listener import ConnectionGate, ContextHolder, TLSSite
from gateway.shell.settings import load_config
from gateway.shell.upstream_tls import upstream_context
from gateway.tools import pki

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
STATE = f"/orders/{ORDER_CRM}/state"
OTHER_NAME = "api.upstream.example"   # a name the URL does not carry
BAD_GATEWAY = "urn:gateway:problem:bad-gateway"


@dataclass
class UpstreamPKI:
    """The upstream's CA and certificates, another CA, and client certificates for the gateway."""

    dir: Path

    def pem(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")


@pytest.fixture(scope="module")
def up_pki(tmp_path_factory) -> UpstreamPKI:
    folder = tmp_path_factory.mktemp("upstream-pki")
    valid = {"not_before": NOW - DAY, "not_after": NOW + 100 * DAY}
    ca = pki.make_ca("upstream CA", **valid)
    other_ca = pki.make_ca("another CA", **valid)

    def put(name: str, cert_key) -> None:
        pki.write_pem(folder / f"{name}.pem", cert_key[0])
        if len(cert_key) > 1:
            pki.write_pem(folder / f"{name}-key.pem", cert_key[1])

    put("ca", ca[:1])
    put("other-ca", other_ca[:1])
    put("server", pki.make_server_cert(*ca, **valid))                        # localhost, 127.0.0.1, ::1
    put("named", pki.make_server_cert(*ca, dns=(OTHER_NAME,), ips=(), **valid))
    put("client", pki.make_client_cert(*ca, "gateway", **valid))
    put("expired-client", pki.make_client_cert(*ca, "gateway", not_before=NOW - 10 * DAY, not_after=NOW - DAY))
    key = serialization.load_pem_private_key((folder / "client-key.pem").read_bytes(), None)
    (folder / "encrypted-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    return UpstreamPKI(folder)


@asynccontextmanager
async def tls_upstream(app: web.Application, cert: str, key: str, client_ca: str | None = None,
                       max_version: ssl.TLSVersion | None = None, names: list | None = None):
    """`app` served over TLS on a free loopback port (listening once this yields); `client_ca` asks for
    client certificates; `names` records the SNI each handshake sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    if max_version is not None:
        ctx.maximum_version = max_version
    if names is not None:
        ctx.sni_callback = lambda sock, name, context: names.append(name)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        # the gateway's own TLS listener: like nginx, and unlike asyncio's, it sends the alert of a refused
        # handshake before closing, which is what the gateway's log then names
        site = TLSSite(runner, "127.0.0.1", 0, ContextHolder(ctx), 5.0, lambda reason, details: None,
                       ConnectionGate(100))
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def status_of(test_pki, url: str) -> tuple[int, dict | None]:
    """The status and, for a refusal, the problem document."""
    async with session(test_pki, test_pki.client("crm")) as s, s.get(url + STATE) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if resp.content_type == "application/problem+json" else None


async def readyz(config_path: Path) -> tuple[int, dict]:
    admin = load_config(config_path).admin.port
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
        return resp.status, await resp.json()


def gateway_config(folder: Path, test_pki, url: str, **tls) -> Path:
    folder.mkdir(exist_ok=True)
    return write_config(folder, test_pki, url, policies={"crm": POLICIES["crm"]},
                        upstream={"url": url, "timeout_s": 2, **tls})


def last_audit_code(config_path: Path) -> str:
    """The reason code the audit log gave the last request (the problem document names only its kind)."""
    lines = (config_path.parent / "data" / "audit.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["code"]


def upstream_errors(capsys) -> list[dict]:
    oplog.drain()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"upstream_error"' in line]


# -- verified by default ----------------------------------------------------------------------------


async def test_the_upstreams_ca_lets_requests_through(tmp_path, test_pki, up_pki):
    recorder = RecordingUpstream()
    async with tls_upstream(recorder.app(), up_pki.pem("server"), up_pki.pem("server-key")) as port:
        config = gateway_config(tmp_path, test_pki, f"https://127.0.0.1:{port}", ca=up_pki.pem("ca"))
        async with gateway_running(config) as (url, _):
            assert (await status_of(test_pki, url))[0] == 200
            assert (await readyz(config))[0] == 200
    assert recorder.forwarded() == [f"GET {STATE}"]


async def test_an_unknown_ca_is_a_502_and_the_log_and_readyz_say_why(tmp_path, test_pki, up_pki, capsys):
    recorder = RecordingUpstream()
    async with tls_upstream(recorder.app(), up_pki.pem("server"), up_pki.pem("server-key")) as port:
        config = gateway_config(tmp_path, test_pki, f"https://127.0.0.1:{port}", ca=up_pki.pem("other-ca"))
        async with gateway_running(config) as (url, _):
            status, problem = await status_of(test_pki, url)
            ready, body = await readyz(config)
    assert (status, problem["type"], last_audit_code(config)) == (502, BAD_GATEWAY, "upstream_unavailable")
    assert "unable to get local issuer certificate" not in problem["detail"]   # the log's business, not the client's
    assert recorder.seen == []
    [logged] = upstream_errors(capsys)
    assert "certificate verify failed: unable to get local issuer certificate" in logged["cause"]
    assert ready == 503 and "unable to get local issuer certificate" in body["problems"]["upstream"]


async def test_the_system_trust_store_is_the_default(tmp_path, test_pki, up_pki, capsys):
    """Without upstream.ca a private CA is not trusted: nothing is sent to an upstream that was not verified."""
    recorder = RecordingUpstream()
    async with tls_upstream(recorder.app(), up_pki.pem("server"), up_pki.pem("server-key")) as port:
        config = gateway_config(tmp_path, test_pki, f"https://127.0.0.1:{port}")
        async with gateway_running(config) as (url, _):
            assert (await status_of(test_pki, url))[0] == 502
    assert recorder.seen == []
    assert "certificate verify failed" in upstream_errors(capsys)[0]["cause"]


# -- the name ---------------------------------------------------------------------------------------


async def test_a_certificate_for_another_name_is_refused_unless_server_name_says_it(tmp_path, test_pki, up_pki,
                                                                                     capsys):
    recorder, names = RecordingUpstream(), []
    async with tls_upstream(recorder.app(), up_pki.pem("named"), up_pki.pem("named-key"), names=names) as port:
        upstream = f"https://localhost:{port}"
        plain = gateway_config(tmp_path / "plain", test_pki, upstream, ca=up_pki.pem("ca"))
        async with gateway_running(plain) as (url, _):
            assert (await status_of(test_pki, url))[0] == 502
        assert recorder.seen == []
        [logged] = upstream_errors(capsys)
        assert "Hostname mismatch" in logged["cause"] and "'localhost'" in logged["cause"]

        named = gateway_config(tmp_path / "named", test_pki, upstream, ca=up_pki.pem("ca"), server_name=OTHER_NAME)
        async with gateway_running(named) as (url, _):
            assert (await status_of(test_pki, url))[0] == 200
    assert recorder.forwarded() == [f"GET {STATE}"]
    assert names[-1] == OTHER_NAME   # sent as SNI too


# -- mutual TLS to the upstream ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_an_upstream_wanting_a_client_certificate(tmp_path, test_pki, up_pki, capsys, version):
    """TLS 1.3 refuses a missing client certificate after the handshake, with an alert the log names too."""
    recorder = RecordingUpstream()
    async with tls_upstream(recorder.app(), up_pki.pem("server"), up_pki.pem("server-key"),
                            client_ca=up_pki.pem("ca"), max_version=version) as port:
        upstream = f"https://127.0.0.1:{port}"
        with_cert = gateway_config(tmp_path / "with", test_pki, upstream, ca=up_pki.pem("ca"),
                                   cert=up_pki.pem("client"), key=up_pki.pem("client-key"))
        async with gateway_running(with_cert) as (url, _):
            assert (await status_of(test_pki, url))[0] == 200
        assert recorder.forwarded() == [f"GET {STATE}"]

        without = gateway_config(tmp_path / "without", test_pki, upstream, ca=up_pki.pem("ca"))
        async with gateway_running(without) as (url, _):
            status, problem = await status_of(test_pki, url)
    assert (status, problem["type"], last_audit_code(without)) == (502, BAD_GATEWAY, "upstream_unavailable")
    assert recorder.forwarded() == [f"GET {STATE}"]   # nothing more got through
    [logged] = upstream_errors(capsys)
    assert "upstream.cert" in logged["cause"], logged
    assert ("certificate required" if version is ssl.TLSVersion.TLSv1_3 else "handshake failure") in logged["cause"]


async def test_a_key_that_is_not_the_certificates_stops_the_start(tmp_path, test_pki, up_pki):
    config = gateway_config(tmp_path, test_pki, "https://127.0.0.1:9", ca=up_pki.pem("ca"),
                            cert=up_pki.pem("client"), key=up_pki.pem("server-key"))
    with pytest.raises(SettingsError) as caught:
        async with gateway_running(config):
            pass
    assert caught.value.key == "upstream.cert/upstream.key" and "do not belong together" in str(caught.value)


# -- restart-only, as upstream.url ------------------------------------------------------------------


async def test_a_changed_upstream_ca_is_logged_as_needing_a_restart(tmp_path, test_pki, up_pki, capsys):
    recorder = RecordingUpstream()
    async with tls_upstream(recorder.app(), up_pki.pem("server"), up_pki.pem("server-key")) as port:
        upstream = f"https://127.0.0.1:{port}"
        config = gateway_config(tmp_path, test_pki, upstream, ca=up_pki.pem("ca"))
        async with gateway_running(config) as (url, running):
            data = json.loads(config.read_text())
            data["upstream"]["ca"] = up_pki.pem("other-ca")
            config.write_text(json.dumps(data))
            assert lifecycle.reload(running) is True
            assert (await status_of(test_pki, url))[0] == 200   # the CA it started with is still the one in use
    oplog.drain()
    restarts = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "reload_needs_restart" in line]
    assert [e["keys"] for e in restarts] == [["upstream.ca"]]


# -- gateway check ----------------------------------------------------------------------------------


def check(config: Path) -> tuple[int, str, str]:
    proc = subprocess.run(gateway_command("check", "-c", str(config)), cwd=config.parent, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("url, keys, named, says", [
    ("https://127.0.0.1:9", {"cert": "client"}, "upstream.key:", "is required with upstream.cert"),
    ("https://127.0.0.1:9", {"key": "client-key"}, "upstream.cert:", "is required with upstream.key"),
    ("http://127.0.0.1:9", {"ca": "ca"}, "upstream.ca:", "only applies to an https:// upstream"),
    ("embedded", {"cert": "client", "key": "client-key"}, "upstream.cert:", "only applies to an https:// upstream"),
    ("http://127.0.0.1:9", {"server_name": OTHER_NAME}, "upstream.server_name:", "upstream.url is http://"),
    ("https://127.0.0.1:9", {"ca": "missing"}, "upstream.ca:", "does not exist"),
    ("https://127.0.0.1:9", {"ca": "client-key"}, "upstream.ca:", "holds no usable CA certificate"),
    ("https://127.0.0.1:9", {"cert": "client", "key": "server-key"}, "upstream.cert/upstream.key:",
     "do not belong together"),
    ("https://127.0.0.1:9", {"cert": "client", "key": "encrypted-key"}, "upstream.key:", "is encrypted"),
    ("https://127.0.0.1:9", {"cert": "expired-client", "key": "expired-client-key"}, "upstream.cert:", "expired on"),
], ids=["cert-without-key", "key-without-cert", "ca-with-http", "cert-with-embedded", "server-name-with-http",
        "missing-ca", "ca-without-certificate", "mismatched-pair", "encrypted-key", "expired-cert"])
def test_check_names_the_upstream_key(tmp_path, test_pki, up_pki, url, keys, named, says):
    tls = {k: (v if k == "server_name" else up_pki.pem(v)) for k, v in keys.items()}
    rc, out, err = check(gateway_config(tmp_path, test_pki, url, **tls))
    lines = [line for line in err.splitlines() if named in line]
    assert rc == 1 and "OK" not in out, (rc, out, err)
    assert len(lines) == 1 and says in lines[0], err


def test_check_passes_a_good_upstream_tls_setup_without_calling_it(tmp_path, test_pki, up_pki):
    config = gateway_config(tmp_path, test_pki, "https://127.0.0.1:9", ca=up_pki.pem("ca"),
                            cert=up_pki.pem("client"), key=up_pki.pem("client-key"), server_name=OTHER_NAME)
    assert check(config)[:2] == (0, "OK\n")


def test_upstream_tls_paths_are_relative_to_the_config_file(tmp_path, test_pki, up_pki):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "upstream-ca.pem").write_text(Path(up_pki.pem("ca")).read_text())
    config = load_config(gateway_config(folder, test_pki, "https://127.0.0.1:9", ca="upstream-ca.pem"))
    assert config.upstream.ca == folder.resolve() / "upstream-ca.pem"



def test_the_context_verifies_and_wants_tls_1_2_at_least(tmp_path, test_pki, up_pki):
    ctx = upstream_context(load_config(gateway_config(tmp_path, test_pki, "https://127.0.0.1:9", ca=up_pki.pem("ca"))))
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert upstream_context(load_config(gateway_config(tmp_path / "plain", test_pki, "http://127.0.0.1:9"))) is None
