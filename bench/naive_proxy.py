"""The proxy a Python team would write first: aiohttp server + one shared ClientSession.

A peer for bench/gateway.py: what "just put an aiohttp proxy with mTLS in front"
costs, without the gateway's own pool or any of its features. A web.Application
with one catch-all handler forwarding method, path, headers and body on one
aiohttp.ClientSession (keep-alive connections to the upstream); TLS requires a client
certificate of the CA. No identity, policy, audit, metrics or CRL.

    python bench/naive_proxy.py PORT UPSTREAM_URL PKI_DIR
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


def main() -> None:
    port, upstream, pki = int(sys.argv[1]), sys.argv[2].rstrip("/"), Path(sys.argv[3])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def session(app: web.Application):
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with request.app["session"].request(request.method, upstream + request.raw_path, headers=headers,
                                                  data=body or None, allow_redirects=False) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            return web.Response(status=resp.status, body=payload, headers=out)

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, access_log=None, print=None)


if __name__ == "__main__":
    main()
