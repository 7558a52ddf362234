"""`gateway serve`: start the embedded upstream, the mTLS front door and the admin port.

The embedded reference API runs as a child process (`gateway reference-api`),
reached over HTTP like any upstream. The front door is an aiohttp server on a
TLS socket whose handshake is bounded by `limits.header_timeout_s`, as is the
wait for each request's headers (aiohttp's keep-alive timer starts with the
connection and is only cleared by a complete request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from gateway.shell import compat  # noqa: F401  (no software versions in any answer)
from gateway.runtime.admin import admin_app, readiness
from gateway.core.errors import SettingsError, StartError
from gateway.shell.settings import Config, load_config
from gateway.runtime.reloading import fingerprint, merge
from gateway.shell.settings import load_policies
from gateway.runtime.pipeline import Gateway, Pipeline
from gateway.shell.oplog import SUMMARY_INTERVAL_S, Summary, event
from gateway.core.credentials import Trust
from gateway.runtime.embedded import TICK_S, EmbeddedReference
from gateway.shell.tls import CRLFacts, check_crl, crl_is_stale, expiry, load_trust, server_context
from gateway.shell.listener import ConnectionGate, ContextHolder, TLSSite
from gateway.core.audit import Redactor
from gateway.shell.audit_writer import AuditWriter, load_key, redaction_key
from gateway.shell.metrics import Metrics
from gateway.core.ratelimit import Storage, storage_from_url
from gateway.shell.token import TokenIssuer, load_or_create_key
from gateway.shell.upstream import Upstream
from gateway.runtime.workers import READY_EVERY_S, write_readiness

log = logging.getLogger("gateway")


READINESS_INTERVAL_S = 5.0



def build_gateway(config: Config, upstream: Upstream, metrics: Metrics, audit: AuditWriter | None,
                  limiter: Storage | None) -> Gateway:
    """Everything the pipeline needs, checked; raises StartError with one line."""
    if not config.policies.is_dir():
        raise StartError(f"{config.file}: policies: {config.policies} is not a folder of policy files")
    try:
        policies = load_policies(config.policies)
    except SettingsError as exc:
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


def load_tls(config: Config) -> tuple[ssl.SSLContext, CRLFacts | None, Trust]:
    """The TLS context, what the CRL says, and the trust requests are checked against; StartError with one line."""
    try:
        crl = check_crl(config)
        return server_context(config), crl, load_trust(config, crl)
    except SettingsError as exc:
        raise StartError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise StartError(str(SettingsError(config.file, "tls", str(exc)))) from None


def note_crl(facts: CRLFacts | None) -> None:
    if crl_is_stale(facts, time.time()):
        event("crl_expired", next_update=facts.next_update,
              detail="the CRL is past its nextUpdate: every client is refused until a fresh CRL is loaded (SIGHUP)")


def audit_writer(config: Config, metrics: Metrics, worker: int | None = None) -> AuditWriter:
    """The audit writer; each worker process keeps a chain (and file) of its own: PATH.wN."""
    try:
        key = load_key(config.audit.key_file)
    except (OSError, ValueError) as exc:
        raise StartError(f"{config.file}: audit.key_file: {exc}") from None
    path = config.audit.path
    if worker is not None:
        path = path.with_name(f"{path.name}.w{worker}")
    redactor = Redactor(config.audit.redact, redaction_key(config.audit.path, key)) if config.audit.redact else None
    return AuditWriter(path, key, redactor, config.audit.sync, on_written=metrics.audit_records.inc,
                       on_dropped=metrics.audit_dropped.inc)


def limiter_storage(config: Config) -> Storage | None:
    try:
        return storage_from_url(config.rate_limit.storage)
    except ValueError as exc:
        raise StartError(f"{config.file}: {exc}") from None


@dataclass
class Running:
    config: Config
    pipeline: Pipeline
    contexts: ContextHolder
    runner: web.BaseRunner
    admin_runner: web.AppRunner | None
    reference: EmbeddedReference | None
    handshakes: Summary
    tasks: list[asyncio.Task]
    watched: str = ""             # the fingerprint of the watched files at the last (re)load
    worker: int | None = None     # the index of a `serve --workers N` worker

    @property
    def gateway(self) -> Gateway:
        return self.pipeline.gateway


async def start(config: Config, reuse_port: bool = False, worker: int | None = None,
                clock: Callable[[], float] = time.time) -> Running:
    """Start serving; `clock` is the wall clock certificates and CRLs are checked against on each request."""
    metrics = Metrics()
    ctx, crl, trust = load_tls(config)
    contexts = ContextHolder(ctx)
    metrics.set_expiry(expiry(config).times)
    note_crl(crl)
    reference = None
    upstream_url = config.upstream.url
    if upstream_url == "embedded":
        reference = EmbeddedReference(config, on_restart=metrics.upstream_restarts.inc)
        upstream_url = reference.url
    limiter = limiter_storage(config)
    audit = audit_writer(config, metrics, worker)
    gateway = build_gateway(config, Upstream(upstream_url, config.upstream.timeout_s,
                                                 keepalive_s=config.upstream.keepalive_s,
                                                 max_connections=config.upstream.max_connections), metrics, audit, limiter)
    gateway.trust, gateway.tls_context, gateway.clock = trust, ctx, clock
    metrics.init_clients([p.client for p in gateway.policies.policies])
    if reference is not None and worker is None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, reference.start)
        except StartError as exc:
            raise StartError(str(exc)) from None
    else:
        reference = None  # a worker's parent runs the embedded upstream
    await audit.start()
    pipeline = Pipeline(gateway)
    # aiohttp's low-level server with one handler: no router, so nothing answers on the pipeline's behalf
    front = web.Server(pipeline.handle, access_log=None, keepalive_timeout=config.limits.header_timeout_s,
                       auto_decompress=False)
    runner = web.ServerRunner(front, handle_signals=False, shutdown_timeout=config.limits.drain_timeout_s)
    await runner.setup()
    runner.server.on_http_error = pipeline.http_error
    handshakes = Summary("handshake_failure")

    def on_failure(reason: str, details: dict) -> None:
        metrics.handshake_failures.labels(reason).inc()
        handshakes.add(reason, key=details.get("subject"), **details)

    gate = ConnectionGate(config.limits.max_connections, on_count=metrics.connections_open.set,
                          on_refused=metrics.connections_refused.labels("limit").inc)
    site = TLSSite(runner, config.listen.host, config.listen.port, contexts, config.limits.header_timeout_s,
                   on_failure, gate, reuse_port=reuse_port)
    admin_runner = None
    if worker is None:  # workers: the parent serves the admin port for all of them (workers.py)
        admin_runner = web.AppRunner(admin_app(pipeline), access_log=None, handle_signals=False)
        await admin_runner.setup()
    running = Running(config, pipeline, contexts, runner, admin_runner, reference, handshakes, [], worker=worker)
    try:
        await site.start()
        if admin_runner is not None:
            await web.TCPSite(admin_runner, config.admin.host, config.admin.port, reuse_port=None).start()
    except OSError as exc:
        await stop(running, quiet=True)
        raise StartError(f"cannot listen: {exc.strerror or exc}") from None
    running.tasks.append(asyncio.create_task(_summaries(running), name="summaries"))
    running.tasks.append(asyncio.create_task(_readiness(running), name="readiness"))
    running.watched = fingerprint(config)
    running.tasks.append(asyncio.create_task(_watch(running), name="watch-files"))
    if reference is not None:
        running.tasks.append(asyncio.create_task(_supervise(reference), name="supervise-upstream"))
    event("start", listen=f"https://{config.listen.host}:{config.listen.port}",
          admin=f"http://{config.admin.host}:{config.admin.port}", upstream=upstream_url,
          clients=[p.client for p in gateway.policies.policies], rate_limit=config.rate_limit.storage,
          audit=str(audit.path), **({"worker": worker} if worker is not None else {}))
    return running


async def _summaries(running: Running) -> None:
    """Once a minute: handshake failure and upstream error summaries, and a stale CRL reminder."""
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_S)
        running.handshakes.flush()
        running.pipeline.upstream_errors.flush()
        try:
            note_crl(check_crl(running.config))
        except (SettingsError, OSError, ValueError):
            pass


async def _supervise(reference: EmbeddedReference) -> None:
    """Reap and restart the embedded reference API whenever it exits (see embedded.py)."""
    while True:
        reference.tick()
        await asyncio.sleep(TICK_S)


async def _readiness(running: Running) -> None:
    """Keep gateway_ready current even when nobody polls /readyz; a worker tells its parent too."""
    while True:
        gw = running.gateway
        problems = await readiness(gw)
        gw.metrics.ready.set(0 if problems else 1)
        if running.worker is not None:
            write_readiness(running.worker, problems)
            await asyncio.sleep(READY_EVERY_S)
        else:
            await asyncio.sleep(READINESS_INTERVAL_S)


def reload(running: Running) -> bool:
    """SIGHUP (or a watched file changed): re-read config.yaml, build the new TLS context and policy
    set aside, check them, then swap them in at once. Keys that need a restart are logged, not applied."""
    gw = running.gateway
    try:
        config, applied, restart = merge(running.config, load_config(running.config.file))
        ctx, crl, trust = load_tls(config)
        policies = load_policies(config.policies)
    except (StartError, SettingsError, SettingsError) as exc:
        gw.metrics.config_reloads.labels("error").inc()
        event("reload", result="error", error=str(exc), detail="the running configuration is kept")
        return False
    running.config = config
    running.contexts.context = ctx  # new handshakes only; open connections keep theirs
    running.pipeline.gateway = dataclasses.replace(gw, config=config, policies=policies, trust=trust,
                                                   tls_context=ctx)
    gw.metrics.set_expiry(expiry(config).times)
    gw.metrics.init_clients([p.client for p in policies.policies])
    gw.metrics.config_reloads.labels("ok").inc()
    event("reload", result="ok", clients=[p.client for p in policies.policies],
          revoked=len(crl.revoked) if crl else 0, **({"applied": applied} if applied else {}))
    if restart:
        event("reload_needs_restart", keys=restart,
              detail="these keys changed in the config file but take effect only when the gateway restarts")
    note_crl(crl)
    running.watched = fingerprint(config)
    return True


async def _watch(running: Running) -> None:
    """reload.watch_s: reload, as SIGHUP does, when a watched file's bytes change."""
    while True:
        every = running.config.reload.watch_s
        await asyncio.sleep(every or 1.0)
        if not every:
            continue
        now = await asyncio.get_running_loop().run_in_executor(None, fingerprint, running.config)
        if now != running.watched:
            running.watched = now  # a failed reload is not retried until the files change again
            event("reload_triggered", by="file change")
            reload(running)


async def stop(running: Running, quiet: bool = False) -> None:
    """Stop accepting, let in-flight requests finish (limits.drain_timeout_s), flush the audit log."""
    for task in running.tasks:
        task.cancel()
    gw = running.gateway
    await running.runner.cleanup()
    if running.admin_runner is not None:
        await running.admin_runner.cleanup()
    await gw.upstream.close()
    if gw.audit is not None:
        await gw.audit.close()
    if gw.limiter is not None:
        await gw.limiter.close()
    if running.reference is not None:
        running.reference.stop()
    if not quiet:
        running.handshakes.flush()
        event("stop")


def raise_open_files_limit(config: Config) -> None:
    """Room for limits.max_connections client and upstream.max_connections upstream sockets, and files."""
    wanted = config.limits.max_connections + config.upstream.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        event("open_files_limit", limit=target, wanted=wanted,
              detail="the hard limit on open files is below limits.max_connections: raise it (ulimit -Hn)")


async def _main(config: Config, reuse_port: bool = False, worker: int | None = None) -> None:
    raise_open_files_limit(config)
    running = await start(config, reuse_port, worker)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGHUP, reload, running)
    try:
        await done.wait()
        event("stopping", detail="no new connections; finishing requests in flight")
    finally:
        await stop(running)


def serve(config: Config, workers: int = 1) -> None:
    """Run until SIGTERM or SIGINT; raises StartError when the gateway cannot start."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if workers > 1:
        raise StartError("internal: serve_workers runs more than one worker")
    asyncio.run(_main(config))


def serve_worker(config: Config, index: int) -> None:
    """One worker of `serve --workers N` (started by the parent, see workers.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    asyncio.run(_main(config, reuse_port=True, worker=index))
