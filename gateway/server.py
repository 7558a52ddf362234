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
from gateway.tls import TLSConfigError, expiry, server_context
from gateway.tls_listener import ContextHolder, TLSSite
from gateway.audit import Redactor
from gateway.audit_writer import AuditWriter, load_key, redaction_key
from gateway.metrics import Metrics
from gateway.ratelimit import Storage, storage_from_url
from gateway.token import TokenIssuer, load_or_create_key
from gateway.upstream import Upstream

log = logging.getLogger("gateway")


class StartError(Exception):
    """The gateway cannot start; one line saying why."""


def event(kind: str, **fields) -> None:
    """One JSON line on stdout: the operational log, apart from the audit log."""
    print(json.dumps({"ts": time.time(), "event": kind, **fields}), flush=True)


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


def build_gateway(config: Config, upstream: Upstream, metrics: Metrics, audit: AuditWriter | None,
                  limiter: Storage | None) -> Gateway:
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
    return Gateway(config=config, policies=policies, upstream=upstream, tokens=tokens, metrics=metrics,
                   audit=audit, limiter=limiter)


def tls_context(config: Config) -> ssl.SSLContext:
    try:
        return server_context(config.tls)
    except TLSConfigError as exc:
        raise StartError(f"{config.file}: {exc}") from None


def audit_writer(config: Config, metrics: Metrics) -> AuditWriter:
    try:
        key = load_key(config.audit.key_file)
    except (OSError, ValueError) as exc:
        raise StartError(f"{config.file}: audit.key_file: {exc}") from None
    redactor = Redactor(config.audit.redact, redaction_key(config.audit.path, key)) if config.audit.redact else None
    return AuditWriter(config.audit.path, key, redactor, on_written=metrics.audit_records.inc,
                       on_dropped=metrics.audit_dropped.inc)


def limiter_storage(config: Config) -> Storage | None:
    try:
        return storage_from_url(config.rate_limit.storage)
    except ValueError as exc:
        raise StartError(f"{config.file}: {exc}") from None


@dataclass
class Running:
    pipeline: Pipeline
    contexts: ContextHolder
    runner: web.AppRunner
    admin_runner: web.AppRunner
    reference: EmbeddedReference | None

    @property
    def gateway(self) -> Gateway:
        return self.pipeline.gateway


async def start(config: Config) -> Running:
    metrics = Metrics()
    contexts = ContextHolder(tls_context(config))
    metrics.set_expiry(expiry(config.tls).times)
    reference = None
    upstream_url = config.upstream.url
    if upstream_url == "embedded":
        reference = EmbeddedReference(config)
        upstream_url = reference.url
    limiter = limiter_storage(config)
    audit = audit_writer(config, metrics)
    gateway = build_gateway(config, Upstream(upstream_url, config.upstream.timeout_s), metrics, audit, limiter)
    if reference is not None:
        await asyncio.get_running_loop().run_in_executor(None, reference.start)
    await gateway.upstream.start()
    await audit.start()
    pipeline = Pipeline(gateway)
    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", pipeline.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0,
                           keepalive_timeout=config.limits.header_timeout_s)
    await runner.setup()
    on_failure = lambda reason: metrics.handshake_failures.labels(reason).inc()  # noqa: E731
    site = TLSSite(runner, config.listen.host, config.listen.port, contexts, config.limits.header_timeout_s,
                   on_failure)
    admin_runner = web.AppRunner(admin_app(pipeline), access_log=None, handle_signals=False)
    await admin_runner.setup()
    running = Running(pipeline, contexts, runner, admin_runner, reference)
    try:
        await site.start()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
    except OSError as exc:
        await stop(running, quiet=True)
        raise StartError(f"cannot listen: {exc.strerror or exc}") from None
    event("start", listen=f"https://{config.listen.host}:{config.listen.port}",
          admin=f"http://{config.admin.host}:{config.admin.port}", upstream=upstream_url,
          clients=[p.client for p in gateway.policies.policies], rate_limit=config.rate_limit.storage,
          audit=str(config.audit.path))
    return running


async def stop(running: Running, quiet: bool = False) -> None:
    gw = running.gateway
    await running.runner.cleanup()
    await running.admin_runner.cleanup()
    await gw.upstream.close()
    if gw.audit is not None:
        await gw.audit.close()
    if gw.limiter is not None:
        await gw.limiter.close()
    if running.reference is not None:
        running.reference.stop()
    if not quiet:
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
