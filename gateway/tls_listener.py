"""The TLS listening socket: handshakes counted by why they failed, contexts swapped live.

asyncio's own TLS server reports a refused handshake nowhere (an SSLError is
an OSError, which it only logs in debug mode), so the listener wraps each
connection in a subclass of asyncio's SSLProtocol that counts failures, and
takes the SSL context from a holder for every new connection: a reload swaps
the holder's context and only new handshakes see it.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

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
    if isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc):
        return "timeout"
    return "other"


class ContextHolder:
    """The SSL context new connections get; replaced whole on reload."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context


class _CountingSSLProtocol(sslproto.SSLProtocol):
    def __init__(self, *args, on_failure: Callable[[str], None], **kwargs):
        super().__init__(*args, **kwargs)
        self._on_failure = on_failure

    def _on_handshake_complete(self, handshake_exc):
        if handshake_exc is None:
            try:
                self._sslobj.getpeercert()
            except Exception as exc:  # what the base class would turn into a failure
                handshake_exc = exc
        if handshake_exc is not None:
            self._on_failure(handshake_failure_reason(handshake_exc))
        return super()._on_handshake_complete(handshake_exc)

    def _check_handshake_timeout(self):
        if self._state == sslproto.SSLProtocolState.DO_HANDSHAKE:
            self._on_failure("timeout")
        return super()._check_handshake_timeout()


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's request handler, answering requests its parser refused through the gateway's hook.

    Without this, a request aiohttp cannot parse gets a text/plain 400 that is neither
    problem+json nor audited. The hook (set on the web.Server) builds both.
    """

    __slots__ = ()

    def handle_error(self, request, status=500, exc=None, message=None):
        hook = getattr(self._manager, "on_http_error", None)
        if hook is None or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        self.log_debug("refused a malformed request: %s", message)
        response = hook(request, status, message or "")
        response.force_close()
        return response


class TLSSite(web.BaseSite):
    """Like web.TCPSite, with TLS done by _CountingSSLProtocol and a bounded handshake."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, contexts: ContextHolder,
                 handshake_timeout: float, on_failure: Callable[[str], None], reuse_port: bool = False):
        super().__init__(runner)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._contexts, self._timeout, self._on_failure = contexts, handshake_timeout, on_failure

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"


    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()

        def factory():
            handler = self._runner.server()
            handler.__class__ = _ProblemRequestHandler  # same layout: only handle_error differs
            return _CountingSSLProtocol(
                loop, handler, self._contexts.context, None, server_side=True,
                ssl_handshake_timeout=self._timeout, on_failure=self._on_failure,
            )

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port or None,
        )
