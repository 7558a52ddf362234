"""The long-lived services a gateway process opens once: tokens, the audit writer, the rate-limit
storage, the upstream client and its order look-ups, and the embedded upstream. Each is entered on
the start's AsyncExitStack as it is opened, so it is closed in reverse order, also when a later
step fails (as aiohttp's CleanupContext does for an application's resources).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Callable

from gateway.core.audit import Redactor
from gateway.core.errors import SettingsError, StartError
from gateway.runtime.embedded import EmbeddedReference
from gateway.runtime.snapshot import Gateway, Snapshot
from gateway.shell.audit_writer import AuditWriter, load_key, redaction_key
from gateway.shell.limits import storage_from_url
from gateway.shell.metrics import Metrics
from gateway.shell.orders import Orders
from gateway.shell.revocation import RevocationChecker
from gateway.shell.settings import Config
from gateway.shell.token import TokenIssuer, configured_key
from gateway.shell.upstream import Upstream
from gateway.shell.upstream_tls import upstream_context


def token_issuer(config: Config) -> TokenIssuer | None:
    if config.identity_token is None:
        return None
    if config.identity_token.key is None:
        raise StartError(f"{config.file}: identity_token.key: is required")
    try:
        key = configured_key(config.identity_token, config.file)
        return TokenIssuer(key, config.identity_token.audience, config.identity_token.ttl_s)
    except SettingsError as exc:
        raise StartError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise StartError(f"{config.file}: identity_token.key: {exc}") from None


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


async def open_services(stack: contextlib.AsyncExitStack, snap: Snapshot, metrics: Metrics, worker: int | None,
                        clock: Callable[[], float] = time.time) -> tuple[Gateway, EmbeddedReference | None]:
    """Open every service of a gateway process on `stack`; the Gateway over them and `snap`."""
    config = snap.config
    tokens = token_issuer(config)
    try:
        limiter = storage_from_url(config.rate_limit.storage)
    except ValueError as exc:
        raise StartError(f"{config.file}: {exc}") from None
    stack.push_async_callback(limiter.close)
    reference = None
    upstream_url = config.upstream.url
    if upstream_url == "embedded":
        embedded = EmbeddedReference(config, on_restart=metrics.upstream_restarts.inc)
        upstream_url = embedded.url
        if worker is None:  # a worker's parent runs the embedded upstream
            embedded.spawn_first()  # from this thread: the child's death signal is tied to it
            stack.callback(embedded.stop)
            await asyncio.get_running_loop().run_in_executor(None, embedded.start)
            reference = embedded
    upstream = Upstream(upstream_url, config.upstream.timeout_s, ssl_context=upstream_context(config),
                        keepalive_s=config.upstream.keepalive_s, max_connections=config.upstream.max_connections,
                        server_name=config.upstream.server_name,
                        ready_path="/readyz" if config.upstream.url == "embedded" else None)
    stack.push_async_callback(upstream.close)
    audit = audit_writer(config, metrics, worker)
    await audit.start()
    stack.push_async_callback(audit.close)
    revocation = None
    if config.tls.revocation.enabled:
        revocation = RevocationChecker(config.tls.revocation, metrics, clock)
        metrics.init_revocation()
        stack.push_async_callback(revocation.close)
        await revocation.start(snap.trust.cas, config.tls.crl_check)
    gateway = Gateway(config=config, policies=snap.policies, upstream=upstream, orders=Orders(upstream),
                      tokens=tokens, metrics=metrics, audit=audit, limiter=limiter, trust=snap.trust,
                      tls_context=snap.tls_context, clock=clock, revocation=revocation)
    return gateway, reference
