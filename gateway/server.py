"""`gateway serve`: start the embedded upstream, the mTLS front door and the admin port.

The embedded reference API runs as a child process (`gateway reference-api`),
reached over HTTP like any upstream. The front door is an aiohttp server on a
TLS socket whose handshake is bounded by `limits.header_timeout_s`, as is the
wait for each request's headers (aiohttp's keep-alive timer starts with the
connection and is only cleared by a complete request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from aiohttp import web

from gateway.admin import admin_app
from gateway.config import Config, parse_host_port
from gateway.policy import PolicyError, load_policies
from gateway.proxy import Gateway, Pipeline
from gateway.tls import TLSConfigError, server_context
from gateway.token import TokenIssuer, load_or_create_key
from gateway.upstream import Upstream

log = logging.getLogger("gateway")


class StartError(Exception):
    """The gateway cannot start; one line saying why."""


def event(kind: str, **fields) -> None:
    """One JSON line on stdout: the operational log, apart from the audit log."""
    print(json.dumps({"ts": time.time(), "event": kind, **fields}), flush=True)


class TLSSite(web.BaseSite):
    """Like web.TCPSite, with the TLS handshake bounded in time."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext,
                 handshake_timeout: float, reuse_port: bool = False):
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port or None,
            ssl_handshake_timeout=self._handshake_timeout,
        )


class EmbeddedReference:
    """The reference API as a child process, for `upstream.url: embedded`."""

    def __init__(self, config: Config):
        self.config = config
        host, port = parse_host_port(config.reference_api.listen, config.file, "reference_api.listen")
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, deadline_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "reference-api", "-c", str(self.config.file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() or "").strip().splitlines()
                raise StartError(f"the embedded reference API did not start: {err[-1] if err else 'exited'}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise StartError(f"the embedded reference API did not answer on {self.url} within {deadline_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def build_gateway(config: Config, upstream_url: str) -> Gateway:
    """Everything the pipeline needs, checked; raises StartError with one line."""
    try:
        policies = load_policies(config.policies)
    except PolicyError as exc:
        raise StartError(str(exc)) from None
    tokens = None
    if config.identity_token is not None:
        if config.identity_token.key is None:
            raise StartError(f"{config.file}: identity_token.key: is required")
        try:
            key = load_or_create_key(config.identity_token.key)
            tokens = TokenIssuer(key, config.identity_token.audience, config.identity_token.ttl_s)
        except (OSError, ValueError) as exc:
            raise StartError(f"{config.file}: identity_token.key: {exc}") from None
    upstream = Upstream(upstream_url, config.upstream.timeout_s)
    return Gateway(config=config, policies=policies, upstream=upstream, tokens=tokens)


def tls_context(config: Config) -> ssl.SSLContext:
    try:
        return server_context(config.tls)
    except TLSConfigError as exc:
        raise StartError(f"{config.file}: {exc}") from None


@dataclass
class Running:
    gateway: Gateway
    runner: web.AppRunner
    admin_runner: web.AppRunner
    reference: EmbeddedReference | None


async def start(config: Config) -> Running:
    ctx = tls_context(config)
    reference = None
    upstream_url = config.upstream.url
    if upstream_url == "embedded":
        reference = EmbeddedReference(config)
        upstream_url = reference.url
    gateway = build_gateway(config, upstream_url)
    if reference is not None:
        await asyncio.get_running_loop().run_in_executor(None, reference.start)
    await gateway.upstream.start()
    pipeline = Pipeline(gateway)
    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", pipeline.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0,
                           keepalive_timeout=config.limits.header_timeout_s)
    await runner.setup()
    site = TLSSite(runner, config.listen.host, config.listen.port, ctx, config.limits.header_timeout_s)
    admin_runner = web.AppRunner(admin_app(pipeline), access_log=None, handle_signals=False)
    await admin_runner.setup()
    try:
        await site.start()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
    except OSError as exc:
        await runner.cleanup()
        await admin_runner.cleanup()
        await gateway.upstream.close()
        if reference is not None:
            reference.stop()
        raise StartError(f"cannot listen: {exc.strerror or exc}") from None
    event("start", listen=f"https://{config.listen.host}:{config.listen.port}",
          admin=f"http://{config.admin.host}:{config.admin.port}", upstream=upstream_url,
          clients=[p.client for p in gateway.policies.policies])
    return Running(gateway, runner, admin_runner, reference)


async def stop(running: Running) -> None:
    await running.runner.cleanup()
    await running.admin_runner.cleanup()
    await running.gateway.upstream.close()
    if running.reference is not None:
        running.reference.stop()
    event("stop")


async def _main(config: Config) -> None:
    running = await start(config)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await stop(running)


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; raises StartError when the gateway cannot start."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    asyncio.run(_main(config))
