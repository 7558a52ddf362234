"""What the pipeline works with, replaced whole on reload: the settings snapshot and the services.

`build_snapshot(config)` reads and checks everything a reload may change (TLS
context, trust, policies, expiry times) and is used by start and reload alike,
so the two cannot build them differently. The services (upstream, order
look-ups, audit writer, rate-limit storage, metrics, tokens) live as long as
the process and are carried from one Gateway to the next.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import UnsupportedAlgorithm

from gateway.core.credentials import Trust
from gateway.core.errors import SettingsError
from gateway.core.policy import PolicySet
from gateway.shell.audit_writer import AuditWriter
from gateway.shell.limits import Storage
from gateway.shell.metrics import Metrics
from gateway.shell.orders import Orders
from gateway.shell.revocation import RevocationChecker
from gateway.shell.settings import Config, load_policies
from gateway.shell.tls import CRLFacts, check_crl, expiry, load_trust, server_context
from gateway.shell.token import TokenIssuer
from gateway.shell.upstream import Upstream


@dataclass(frozen=True)
class Snapshot:
    """Everything a reload rebuilds, checked before it is used."""

    config: Config
    tls_context: ssl.SSLContext
    crl: CRLFacts | None
    trust: Trust
    policies: PolicySet
    expiry: dict[str, float]
    crl_this_update: dict[str, float]   # the CRL labels of `expiry` -> their lastUpdate


def build_snapshot(config: Config) -> Snapshot:
    """Read and check the TLS files and the policies of `config`; SettingsError (file, key, problem) if unusable.

    The key says what is wrong (`tls.*` for the TLS files), so that a reload from the file watcher can
    tell a rotation half done (a key without its certificate, a file still being written) from a policy
    that is wrong."""
    if not config.policies.is_dir():
        raise SettingsError(config.file, "policies", f"{config.policies} is not a folder of policy files")
    try:
        crl = check_crl(config)
        ctx = server_context(config)
        trust = load_trust(config, crl)
        policies = load_policies(config.policies)
        due = expiry(config)
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise SettingsError(config.file, "tls", str(exc) or type(exc).__name__) from None
    return Snapshot(config, ctx, crl, trust, policies, due.times, due.crl_this_update)


@dataclass
class Gateway:
    """One consistent view for a request: a snapshot's settings, and the long-lived services."""

    config: Config
    policies: PolicySet
    upstream: Upstream
    orders: Orders
    tokens: TokenIssuer | None
    metrics: Metrics
    audit: AuditWriter | None = None
    limiter: Storage | None = None
    trust: Trust | None = None                 # client CAs and CRLs in force: checked on every request
    tls_context: ssl.SSLContext | None = None  # the context new handshakes get (the trust's generation)
    clock: Callable[[], float] = time.time
    revocation: RevocationChecker | None = None  # tls.revocation: OCSP answers and fetched CRLs, per request

    def with_snapshot(self, snap: Snapshot) -> "Gateway":
        from dataclasses import replace

        return replace(self, config=snap.config, policies=snap.policies, trust=snap.trust, tls_context=snap.tls_context)
