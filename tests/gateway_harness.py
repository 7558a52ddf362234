"""Test harness for the front door: a test PKI, config files, the gateway in-process, a recording upstream."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from conftest import free_port
from gateway.tools import certs, pki
from gateway.shell.settings import load_config
from gateway.runtime import lifecycle as server

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)
ORDER_HR = "11111111-1111-4111-8111-111111111111"     # solicitor INTERNAL sAMAccountName=cborgstrom
ORDER_CRM = "22222222-2222-4222-8222-222222222222"    # solicitor EXTERNAL 198603052385
ORDER_SLOW = "33333333-3333-4333-8333-333333333333"   # its state answers after the upstream timeout

POLICIES = {
    "hr-system": {
        "client": "hr-system", "match": {"subject": "CN=hr-system,O=gateway example"},
        "allow": ["create_order", "read_order", "order_state", "download_document", "delete_order",
                  "anonymize_user"],
        "solicitors": [{"source": "INTERNAL", "identifier": "sAMAccountName=*"}],
        "anonymize": ["*"],
    },
    "crm": {
        "client": "crm", "match": {"common_name": "crm"},
        "allow": ["create_order", "read_order", "order_state", "download_document"],
        "solicitors": [{"source": "EXTERNAL", "identifier": "*"}],
        "max_upload_bytes": 200_000,
    },
    "lawyer": {"client": "lawyer", "match": {"common_name": "lawyer"}, "allow": ["anonymize_user"],
               "anonymize": ["EXTERNAL:19*"]},
}


@dataclass
class PKIFolder:
    dir: Path

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / "clients" / f"{name}.crt", self.dir / "clients" / f"{name}.key"

    def special(self, name: str) -> tuple[Path, Path]:
        return self.dir / "special" / f"{name}.crt", self.dir / "special" / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"


def build_pki(dir: Path) -> PKIFolder:
    """The example PKI plus certificates only the handshake may refuse (all named hr-system)."""
    certs.init(dir, ["hr-system", "crm", "stranger", "lawyer", "revoked-one"])
    ca_cert, ca_key = pki.load_ca(dir)
    special = dir / "special"
    special.mkdir()

    def put(name: str, cert_key) -> None:
        pki.write_pem(special / f"{name}.crt", cert_key[0])
        pki.write_pem(special / f"{name}.key", cert_key[1])

    put("expired", pki.make_client_cert(ca_cert, ca_key, "hr-system", not_before=NOW - 10 * DAY,
                                        not_after=NOW - DAY))
    put("not-yet-valid", pki.make_client_cert(ca_cert, ca_key, "hr-system", not_before=NOW + DAY,
                                              not_after=NOW + 10 * DAY))
    put("server-auth-only", pki.make_client_cert(ca_cert, ca_key, "hr-system", not_before=NOW - DAY,
                                                 not_after=NOW + 10 * DAY, eku=("serverAuth",)))
    other_ca = pki.make_ca("another CA", not_before=NOW - DAY, not_after=NOW + 10 * DAY)
    put("wrong-ca", pki.make_client_cert(*other_ca, "hr-system", not_before=NOW - DAY, not_after=NOW + 10 * DAY))
    certs.revoke(dir, "revoked-one")
    return PKIFolder(dir)


def write_config(dir: Path, test_pki: PKIFolder, upstream_url: str, policies: dict | None = None,
                 **sections) -> Path:
    """A config.yaml (and policies/) for the gateway on free ports; `sections` override whole sections."""
    pol_dir = dir / "policies"
    pol_dir.mkdir(exist_ok=True)
    for name, policy in (POLICIES if policies is None else policies).items():
        (pol_dir / f"{name}.yaml").write_text(json.dumps(policy))
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "tls": {"cert": str(test_pki.dir / "server.crt"), "key": str(test_pki.dir / "server.key"),
                "client_ca": str(test_pki.ca), "crl": str(test_pki.dir / "crl.pem")},
        "policies": "policies",
        "upstream": {"url": upstream_url, "timeout_s": 2},
        "reference_api": {"listen": f"127.0.0.1:{free_port()}", "data_dir": "data",
                          "directory": str(Path(__file__).resolve().parent.parent / "directory.yaml")},
        "audit": {"path": "data/audit.jsonl"},
        "limits": {"max_body_bytes": 1_000_000, "header_timeout_s": 2, "request_timeout_s": 10},
    }
    config.update(sections)
    path = dir / "config.yaml"
    path.write_text(json.dumps(config))
    return path


@asynccontextmanager
async def gateway_running(config_path: Path):
    """`gateway serve` in this process and loop; yields its base URL."""
    config = load_config(config_path)
    running = await server.start(config)
    try:
        yield f"https://localhost:{config.listen.port}", running
    finally:
        await server.stop(running)


def client_context(test_pki: PKIFolder, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(test_pki.ca))
    if cert is not None:
        ctx.load_cert_chain(*map(str, cert))
    return ctx


def session(test_pki: PKIFolder, cert: tuple[Path, Path] | None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(test_pki, cert)))


@dataclass
class Recorded:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_length: int


@dataclass
class RecordingUpstream:
    """An upstream that records what reaches it and answers like the Automation API would."""

    seen: list[Recorded] = field(default_factory=list)
    solicitors: dict[str, dict] = field(default_factory=lambda: {
        ORDER_HR: {"source": "INTERNAL", "identifier": "sAMAccountName=cborgstrom"},
        ORDER_CRM: {"source": "EXTERNAL", "identifier": "198603052385"},
        ORDER_SLOW: {"source": "EXTERNAL", "identifier": "198603052385"},
    })
    document_bytes: int = 1000
    latency_s: float = 0.0    # how long each answer takes, as a real upstream's database look-up would
    cut_after: int | None = None   # documents: close the connection after this many bytes of the body

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.seen]

    def forwarded(self) -> list[str]:
        """What reached the upstream apart from the gateway's order look-ups."""
        return [f"{r.method} {r.path}" for r in self.seen
                if not (r.method == "GET" and r.path.count("/") == 2 and r.path.startswith("/orders/")
                        and dict((k.lower(), v) for k, v in r.headers).get("accept") == "application/json")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.raw_path == "/":
            return web.Response(status=404, text="readiness probe")  # the gateway's /readyz check: not a call
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        self.seen.append(Recorded(request.method, request.raw_path, list(request.headers.items()),
                                  digest.hexdigest(), length))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        parts = request.path.strip("/").split("/")
        if parts[0] == "orders" and len(parts) >= 2:
            order_id = parts[1]
            if order_id not in self.solicitors:
                return web.json_response({"status": 404}, status=404)
            if order_id == ORDER_SLOW and parts[-1] == "state":
                await asyncio.sleep(5)
            if len(parts) == 2 and request.method == "GET":
                return web.json_response({"id": order_id, "solicitor": self.solicitors[order_id]})
            if parts[-1] == "document":
                resp = web.StreamResponse(headers={"Content-Type": "application/pdf",
                                                   "Connection": "close, X-Secret-Hop", "X-Secret-Hop": "1"})
                resp.content_length = self.document_bytes
                await resp.prepare(request)
                left = self.document_bytes
                while left:
                    n = min(left, 1 << 20)
                    if self.cut_after is not None and self.document_bytes - left + n > self.cut_after:
                        await resp.write(b"%" * (self.cut_after - (self.document_bytes - left)))
                        request.transport.close()  # the upstream dies mid-answer
                        return resp
                    await resp.write(b"%" * n)
                    left -= n
                await resp.write_eof()
                return resp
        return web.Response(text="ok", headers={"X-Body-SHA256": digest.hexdigest()})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app
