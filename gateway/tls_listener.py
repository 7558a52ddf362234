"""The TLS listening socket: handshakes counted by why they failed, contexts swapped live, connections capped.

Each connection gets asyncio's TLS protocol as adapted in compat.py (failures
reported, a shared read buffer, a gate), the SSL context new connections get
from a holder (a reload swaps the holder's context; only new handshakes see
it), and aiohttp's request handler answering parse errors through the pipeline.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from aiohttp import web

from gateway.compat import GatedSSLProtocol, problem_request_handler

# OpenSSL X509_V_ERR_* codes
_VERIFY_REASONS = {
    9: "not_yet_valid", 10: "expired", 23: "revoked", 26: "bad_purpose",
    2: "unknown_ca", 18: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca",
    3: "crl", 11: "crl", 12: "crl_expired", 15: "crl", 16: "crl",
}


def handshake_failure_reason(exc: BaseException | None) -> str:
    """A fixed label for why a handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "other")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_certificate"
        if "VERSION" in reason or "PROTOCOL" in reason:
            return "protocol_version"
        return "other"
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)):
        return "timeout"
    return "other"


class ContextHolder:
    """The SSL context new connections get; replaced whole on reload."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context


class ConnectionGate:
    """Open client connections, at most `limit`: past it, new connections are closed at once."""

    def __init__(self, limit: int, on_count: Callable[[int], None] = lambda n: None,
                 on_refused: Callable[[], None] = lambda: None):
        self.limit, self.open = limit, 0
        self.on_count, self.on_refused = on_count, on_refused

    def admit(self) -> bool:
        if self.open >= self.limit:
            self.on_refused()
            return False
        self.open += 1
        self.on_count(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self.on_count(self.open)


class TLSSite(web.BaseSite):
    """Like web.TCPSite, with TLS done by GatedSSLProtocol and a bounded handshake."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, contexts: ContextHolder,
                 handshake_timeout: float, on_failure: Callable[[str], None], gate: ConnectionGate,
                 reuse_port: bool = False):
        super().__init__(runner)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._contexts, self._timeout, self._on_failure, self._gate = contexts, handshake_timeout, on_failure, gate

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()

        def failed(exc: BaseException) -> None:
            self._on_failure(handshake_failure_reason(exc))

        def factory():
            return GatedSSLProtocol(
                loop, problem_request_handler(self._runner.server), self._contexts.context, None,
                server_side=True, ssl_handshake_timeout=self._timeout,
                on_failure=failed, admit=self._gate.admit, release=self._gate.release,
            )

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port or None,
        )
