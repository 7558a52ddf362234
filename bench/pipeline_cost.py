"""What the gateway's request pipeline costs a request, without TLS or a load generator in the way.

bench/gateway.py measures the whole gateway under load, but on a small machine its
figures move by 10-15 % from run to run (the load generator, the upstream and the target
share the cores), which hides a change worth 5 %. This runs the real gateway (`start()`
with every feature on, as in bench/gateway.py: audit sync answer with an HMAC key and
redaction, rate limits, identity tokens, metrics, order scope) against a real nginx
upstream, and calls the front door's handler directly with requests made in process (a
verified client certificate on a stand-in transport), 32 at a time. Against it, in the
same process: a handler that only forwards on the same upstream pool (the floor). The
difference is the pipeline: identity, policy, rate limit, audit line, metrics, headers.

    python bench/pipeline_cost.py [--requests 9600] [--rounds 3]

Prints CPU microseconds a request (process time, the audit helper process not included),
both ways, each round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # before bench/ itself, whose gateway.py is not the package
from gateway.runtime.lifecycle import start, stop  # noqa: E402
from gateway.shell.settings import load_config  # noqa: E402
from gateway.tools import certs  # noqa: E402
from support import bench_gateway  # noqa: E402

CONCURRENCY = 32


class _Certificate:
    """The ssl object of a verified connection, as the pipeline asks it."""

    def __init__(self, leaf: bytes, ca: bytes):
        self.leaf, self.ca = leaf, ca

    def getpeercert(self, binary_form=False):
        return self.leaf

    def get_unverified_chain(self):
        return [self.leaf]   # what the client sent; its CA is in tls.client_ca


class _Transport:
    """A client connection that stays open: its certificate, its address."""

    def __init__(self, certificate: _Certificate, context):
        self.extra = {"ssl_object": certificate, "sslcontext": context, "peername": ("127.0.0.1", 40000)}

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def is_closing(self):
        return False

    def write(self, data):
        pass


async def _measure(handler, transports: list[_Transport], path: str, requests: int) -> float:
    """CPU microseconds a request, `requests` sent CONCURRENCY at a time (one request object a connection)."""
    async def connection(transport: _Transport, n: int) -> None:
        request = make_mocked_request("GET", path, headers={"Host": "localhost", "User-Agent": "bench"},
                                      transport=transport)
        for _ in range(n):
            response = await handler(request)
            if response.status != 200:
                raise RuntimeError(f"answered {response.status}: {response.body!r}")

    await asyncio.gather(*(connection(t, 50) for t in transports))  # warm up: pools, caches, tokens
    each = requests // len(transports)
    before = time.process_time()
    await asyncio.gather(*(connection(t, each) for t in transports))
    return (time.process_time() - before) / (each * len(transports)) * 1e6


async def _run(config_path: Path, pki_dir: Path, path: str, requests: int, rounds: int) -> None:
    running = await start(load_config(config_path))
    try:
        pipeline = running.pipeline
        pool = pipeline.gateway.upstream.pool

        async def forward_only(request: web.BaseRequest) -> web.Response:
            resp = await pool.request(request.method, request.raw_path, {"accept": "*/*"}, read_timeout=30)
            async with resp:
                body = await resp.read()
            return web.Response(status=resp.status, body=body)

        leaf = x509.load_pem_x509_certificate((pki_dir / "clients" / "bench.crt").read_bytes())
        ca = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
        certificate = _Certificate(leaf.public_bytes(Encoding.DER), ca.public_bytes(Encoding.DER))
        transports = [_Transport(certificate, pipeline.gateway.tls_context) for _ in range(CONCURRENCY)]
        floors, gateways = [], []
        for i in range(rounds):
            floors.append(await _measure(forward_only, transports, path, requests))
            gateways.append(await _measure(pipeline.handle, transports, path, requests))
            print(f"round {i + 1}: forward only {floors[-1]:6.1f} us/req   gateway pipeline {gateways[-1]:6.1f} us/req"
                  f"   pipeline cost {gateways[-1] - floors[-1]:6.1f} us/req", flush=True)
        floor, gw = statistics.median(floors), statistics.median(gateways)
        print(f"medians: forward only {floor:.1f} us/req, gateway pipeline {gw:.1f} us/req, "
              f"pipeline cost {gw - floor:.1f} us/req ({min(gateways):.1f}-{max(gateways):.1f})")
    finally:
        await stop(running)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=9600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bg = bench_gateway()
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        raise SystemExit("nginx is needed: it is the upstream (Debian: apt install nginx)")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as name:
        tmp = Path(name)
        certs.init(tmp / "pki", ["bench"])
        upstream = bg.free_port()
        nginx = bg.nginx(binary, tmp / "upstream", bg.NGINX_UPSTREAM, port=upstream,
                         order=json.dumps({"id": bg.ORDER_ID, "solicitor": bg.SOLICITOR}))
        try:
            config_path, _, _ = bg.gateway_config(tmp, upstream)
            bg.poll_ready("nginx", nginx,
                          lambda: socket.create_connection(("127.0.0.1", upstream), timeout=1).close(), 30)
            os.chdir(tmp)  # the config's relative paths
            asyncio.run(_run(config_path, tmp / "pki", f"/orders/{bg.ORDER_ID}/state", args.requests, args.rounds))
        finally:
            bg.stop(nginx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
