"""`gateway serve`: start the embedded upstream, the mTLS front door and the admin port.

The embedded reference API runs as a child process (`gateway reference-api`),
reached over HTTP like any upstream. The front door is an aiohttp server on a
TLS socket whose handshake is bounded by `limits.header_timeout_s`, as is the
wait for each request's headers (aiohttp's keep-alive timer starts with the
connection and is only cleared by a complete request).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from gateway.core.errors import SettingsError, StartError
from gateway.runtime.admin import admin_app, readiness
from gateway.runtime.embedded import supervise
from gateway.runtime.pipeline import Pipeline
from gateway.runtime.reloading import fingerprint, merge
from gateway.runtime.services import open_services
from gateway.runtime.snapshot import Gateway, build_snapshot
from gateway.runtime.workers import READY_EVERY_S, write_readiness
from gateway.shell import compat  # noqa: F401  (no software versions in any answer)
from gateway.shell import oplog
from gateway.shell.listener import ConnectionGate, ContextHolder, ProxyGate, TLSSite
from gateway.shell.metrics import Metrics
from gateway.shell.oplog import SUMMARY_INTERVAL_S, Summary, event, use_for_logging
from gateway.shell.settings import Config, load_config
from gateway.shell.tls import CRLFacts, check_crl, crl_is_stale, example_keys_exposed

READINESS_INTERVAL_S = 5.0


def note_crl(facts: CRLFacts | None) -> None:
    if crl_is_stale(facts, time.time()):
        event("crl_expired", next_update=facts.next_update,
              detail="the CRL is past its nextUpdate: every client is refused until a fresh CRL is loaded "
                     "(a changed tls.crl is picked up within reload.watch_s, or on SIGHUP)")


def note_example_keys(config: Config) -> None:
    for why in example_keys_exposed(config):
        event("insecure_example_key", detail=why)


@dataclass
class Running:
    config: Config
    pipeline: Pipeline
    contexts: ContextHolder
    stack: contextlib.AsyncExitStack    # closes what start opened, in reverse order
    handshakes: Summary
    tasks: list[asyncio.Task]
    watched: str = ""             # the fingerprint of the watched files at the last (re)load
    waiting_for_files: bool = False  # the watcher found TLS files it could not use: it tries once more
    worker: int | None = None     # the index of a `serve --workers N` worker

    @property
    def gateway(self) -> Gateway:
        return self.pipeline.gateway


async def start(config: Config, reuse_port: bool = False, worker: int | None = None,
                clock: Callable[[], float] = time.time) -> Running:
    """Start serving; `clock` is the wall clock certificates and CRLs are checked against on each request.

    Everything opened here is entered on an AsyncExitStack, so that stop(), or a failure half-way
    through start, closes it all in reverse order: the front door stops (draining requests in
    flight) before the audit log, the upstream, the rate-limit storage and the embedded API close.
    """
    snap = build_snapshot(config)
    metrics = Metrics()
    oplog.writer.on_drop = metrics.log_dropped.inc
    metrics.set_expiry(snap.expiry, snap.crl_this_update)
    metrics.init_clients([p.client for p in snap.policies.policies])
    note_crl(snap.crl)
    stack = contextlib.AsyncExitStack()
    try:
        gateway, reference = await open_services(stack, snap, metrics, worker, clock)
        pipeline = Pipeline(gateway)
        contexts = ContextHolder(snap.tls_context)
        handshakes = Summary("handshake_failure")
        running = Running(config, pipeline, contexts, stack, handshakes, [], worker=worker)
        await _open_front_door(stack, running, metrics, reuse_port)
        if worker is None:  # workers: the parent serves the admin port for all of them (workers.py)
            admin = web.AppRunner(admin_app(pipeline), access_log=None, handle_signals=False)
            await admin.setup()
            stack.push_async_callback(admin.cleanup)
            await web.TCPSite(admin, config.admin.host, config.admin.port, reuse_port=None).start()
    except OSError as exc:
        await stack.aclose()
        raise StartError(f"cannot listen: {exc.strerror or exc}") from None
    except BaseException:
        await stack.aclose()
        raise
    running.tasks += [asyncio.create_task(_summaries(running), name="summaries"),
                      asyncio.create_task(_readiness(running), name="readiness"),
                      asyncio.create_task(_watch(running), name="watch-files")]
    if reference is not None:
        running.tasks.append(asyncio.create_task(supervise(reference), name="supervise-upstream"))
    stack.callback(lambda: [task.cancel() for task in running.tasks])
    running.watched = fingerprint(config)
    note_example_keys(config)
    event("start", listen=f"https://{config.listen.host}:{config.listen.port}",
          admin=f"http://{config.admin.host}:{config.admin.port}", upstream=gateway.upstream.base_url,
          clients=[p.client for p in snap.policies.policies], rate_limit=config.rate_limit.storage,
          audit=str(gateway.audit.path) if gateway.audit else None, **({"worker": worker} if worker is not None else {}))
    return running


async def _open_front_door(stack: contextlib.AsyncExitStack, running: Running, metrics: Metrics,
                           reuse_port: bool) -> None:
    """aiohttp's low-level server with one handler: no router, so nothing answers on the pipeline's behalf."""
    config, pipeline = running.config, running.pipeline
    front = web.Server(pipeline.handle, access_log=None, keepalive_timeout=config.limits.header_timeout_s,
                       auto_decompress=False)
    runner = web.ServerRunner(front, handle_signals=False, shutdown_timeout=config.limits.drain_timeout_s)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    runner.server.on_http_error = pipeline.http_error

    def on_failure(reason: str, details: dict) -> None:
        metrics.handshake_failures.labels(reason).inc()
        running.handshakes.add(reason, key=details.get("subject"), **details)

    gate = ConnectionGate(config.limits.max_connections, on_count=metrics.connections_open.set,
                          on_refused=metrics.connections_refused.labels("limit").inc)
    proxy = None
    if config.listen.proxy_protocol:
        def on_proxy_refused(why: str, peer: str | None) -> None:
            metrics.connections_refused.labels("proxy_protocol").inc()
            event("proxy_protocol_refused", peer=peer, detail=why)

        proxy = ProxyGate(config.listen.trusted_proxies, on_proxy_refused)
    await TLSSite(runner, config.listen.host, config.listen.port, running.contexts, config.limits.header_timeout_s,
                  on_failure, gate, reuse_port=reuse_port, proxy=proxy).start()


async def _summaries(running: Running) -> None:
    """Once a minute: handshake failure and upstream error summaries, and a stale CRL reminder."""
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_S)
        running.handshakes.flush()
        running.pipeline.upstream_errors.flush()
        running.pipeline.unsent.flush()
        try:
            note_crl(check_crl(running.config))
        except (SettingsError, OSError, ValueError):
            pass


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


def reload(running: Running, wait_for_files: bool = False) -> bool | None:
    """SIGHUP (or a watched file changed): re-read config.yaml and build the snapshot aside, as start
    does, then swap it in at once. Keys that need a restart are logged, not applied.

    `wait_for_files` (the file watcher's first try): TLS files that cannot be used are taken for a
    rotation half done (a certificate replaced before its key, a file still being written); the reload
    returns None and is tried again at the next watch period, and only then counts as a failure."""
    gw = running.gateway
    try:
        config, applied, restart = merge(running.config, load_config(running.config.file))
        snap = build_snapshot(config)
    except (StartError, SettingsError) as exc:
        if wait_for_files and isinstance(exc, SettingsError) and exc.key.startswith("tls"):
            event("reload_waiting", error=str(exc),
                  detail="the TLS files cannot be used yet: waiting one more watch period for a rotation's "
                         "other file before failing")
            return None
        gw.metrics.config_reloads.labels("error").inc()
        event("reload", result="error", error=str(exc), detail="the running configuration is kept")
        return False
    running.config = config
    running.contexts.context = snap.tls_context  # new handshakes only; open connections keep theirs
    running.pipeline.gateway = gw.with_snapshot(snap)
    gw.metrics.set_expiry(snap.expiry, snap.crl_this_update)
    gw.metrics.init_clients([p.client for p in snap.policies.policies])
    if gw.revocation is not None:
        gw.revocation.use_cas(snap.trust.cas, snap.config.tls.crl_check)
        gw.revocation.publish()
    gw.metrics.config_reloads.labels("ok").inc()
    event("reload", result="ok", clients=[p.client for p in snap.policies.policies],
          revoked=len(snap.crl.revoked) if snap.crl else 0, **({"applied": applied} if applied else {}))
    if restart:
        event("reload_needs_restart", keys=restart,
              detail="these keys changed in the config file but take effect only when the gateway restarts")
    note_crl(snap.crl)
    note_example_keys(config)
    running.watched = fingerprint(config)
    running.waiting_for_files = False
    return True


async def _watch(running: Running) -> None:
    """reload.watch_s: reload, as SIGHUP does, when a watched file's bytes change. Nothing ends the watch:
    an unexpected error is logged and the next period tries again."""
    while True:
        every = running.config.reload.watch_s
        await asyncio.sleep(every or 1.0)
        if not every:
            continue
        try:
            now = await asyncio.get_running_loop().run_in_executor(None, fingerprint, running.config)
            if now != running.watched or running.waiting_for_files:
                running.watched = now  # a failed reload is not retried until the files change again
                if not running.waiting_for_files:
                    event("reload_triggered", by="file change")
                running.waiting_for_files = reload(running, wait_for_files=not running.waiting_for_files) is None
        except Exception as exc:  # noqa: BLE001 - the watch must outlive any one bad reload
            running.waiting_for_files = False
            event("reload", result="error", error=f"{type(exc).__name__}: {exc}",
                  detail="the running configuration is kept; the watch goes on")


async def stop(running: Running, quiet: bool = False) -> None:
    """Stop accepting, let in-flight requests finish (limits.drain_timeout_s), flush the audit log, close all."""
    await running.stack.aclose()
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


def settle_heap() -> None:
    """Once started: what start-up built (modules, certificates, policies, metrics; some 50,000 objects)
    lives as long as the process, so it is moved out of the collector's sight. Otherwise each full
    collection walks all of it, a 12 ms pause of the event loop (measured here) that lands on
    whichever requests are in flight; after this, a full collection walks what serving created."""
    gc.collect()
    gc.freeze()


async def _main(config: Config, reuse_port: bool = False, worker: int | None = None) -> None:
    raise_open_files_limit(config)
    running = await start(config, reuse_port, worker)
    settle_heap()
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
    use_for_logging()
    if workers > 1:
        raise StartError("internal: serve_workers runs more than one worker")
    asyncio.run(_main(config))


def serve_worker(config: Config, index: int) -> None:
    """One worker of `serve --workers N` (started by the parent, see workers.py)."""
    use_for_logging()
    asyncio.run(_main(config, reuse_port=True, worker=index))
