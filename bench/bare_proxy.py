"""The floor for an aiohttp design: a bare mTLS proxy on the gateway's own upstream pool.

An aiohttp web.Application with one catch-all handler that forwards every request
to the upstream with gateway.shell.pool.Pool and sends the answer back in one
write: TLS with a required client certificate, and nothing else (no identity, no
policy, no audit, no metrics). bench/gateway.py measures the gateway against it.

    python bench/bare_proxy.py PORT UPSTREAM_URL PKI_DIR
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.shell.pool import Pool  # noqa: E402


def main() -> None:
    port, upstream, pki = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    pool: Pool | None = None

    async def forward(request: web.Request) -> web.Response:
        nonlocal pool
        pool = pool or Pool(upstream)
        resp = await pool.request(request.method, request.raw_path, {"accept": "*/*"}, read_timeout=30)
        async with resp:
            body = await resp.read()
        return web.Response(status=resp.status, body=body,
                            headers={"Content-Type": resp.headers.get("Content-Type", "text/plain")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, access_log=None, print=None)


if __name__ == "__main__":
    main()
