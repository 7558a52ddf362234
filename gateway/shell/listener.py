"""The TLS listening socket: handshakes counted by why they failed, contexts swapped live, connections capped.

Each connection gets asyncio's TLS protocol as adapted in compat.py (failures
reported, a shared read buffer, a gate), the SSL context new connections get
from a holder (a reload swaps the holder's context; only new handshakes see
it), and aiohttp's request handler answering parse errors through the pipeline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from typing import Callable

from aiohttp import web
from cryptography import x509

from gateway.shell.compat import GatedSSLProtocol, problem_request_handler

# OpenSSL's X509_V_ERR_* codes -> the reason labels of metrics.HANDSHAKE_REASONS
_VERIFY_REASONS = {
    **dict.fromkeys((2, 18, 19, 20, 21, 27, 28, 29, 30, 31, 79), "unknown_ca"),
    10: "expired", 9: "not_yet_valid", 23: "revoked",
    **dict.fromkeys((3, 11, 15, 16, 33, 36, 44, 54), "crl_missing"),   # no usable CRL for the certificate
    12: "crl_expired",
    **dict.fromkeys((26, 39), "bad_purpose"),
    **dict.fromkeys(range(80, 95), "nonconforming"),                     # tls.x509_strict's rules
    **dict.fromkeys((4, 5, 6, 7, 8, 24, 66, 67, 68, 76, 77, 78), "bad_signature"),
}
_PROTOCOL_WORDS = ("VERSION", "PROTOCOL", "HTTP_REQUEST", "RECORD", "CIPHER", "ALERT", "UNEXPECTED_MESSAGE",
                   "BAD_KEY_SHARE", "NO_SHARED", "DECRYPTION_FAILED", "BAD_RECORD_MAC", "LENGTH")


def handshake_failure_reason(exc: BaseException | None) -> str:
    """A fixed label for why a handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "other")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_certificate"
        if any(word in reason for word in _PROTOCOL_WORDS):
            return "protocol"
        return "other"
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "protocol"  # the client hung up mid-handshake (compat makes asyncio's class an instance)
    return "other"


def failure_details(exc: BaseException, presented: bytes | None) -> dict:
    """What the operational log says of a refused handshake: OpenSSL's message, the certificate shown."""
    message = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
    if not isinstance(message, str) or not message:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    details = {"verify_message": message}
    if presented:
        try:
            cert = x509.load_der_x509_certificate(presented)
            details.update(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                           serial=format(cert.serial_number, "x"))
        except ValueError:
            details["certificate"] = "unparsable"
    return details


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


class ProxyGate:
    """listen.proxy_protocol: which peers may send a PROXY header, and what a refused connection does."""

    def __init__(self, trusted: tuple[str, ...], on_refused: Callable[[str, str | None], None]):
        self.networks = [ipaddress.ip_network(text, strict=False) for text in trusted]
        self.on_refused = on_refused

    def trusts(self, peername) -> bool:
        try:
            address = ipaddress.ip_address(peername[0])
        except (TypeError, IndexError, ValueError):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def refused(self, why: str, peername) -> None:
        self.on_refused(why, peername[0] if isinstance(peername, tuple) and peername else None)


class TLSSite(web.BaseSite):
    """Like web.TCPSite, with TLS done by GatedSSLProtocol and a bounded handshake."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, contexts: ContextHolder,
                 handshake_timeout: float, on_failure: Callable[[str, dict], None], gate: ConnectionGate,
                 reuse_port: bool = False, proxy: ProxyGate | None = None):
        super().__init__(runner)
        self._host, self._port, self._reuse_port, self._proxy = host, port, reuse_port, proxy
        self._contexts, self._timeout, self._on_failure, self._gate = contexts, handshake_timeout, on_failure, gate

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()

        def failed(exc: BaseException, presented: bytes | None) -> None:
            self._on_failure(handshake_failure_reason(exc), failure_details(exc, presented))

        def factory():
            return GatedSSLProtocol(
                loop, problem_request_handler(self._runner.server), self._contexts.context, None,
                server_side=True, ssl_handshake_timeout=self._timeout,
                on_failure=failed, admit=self._gate.admit, release=self._gate.release, proxy=self._proxy,
            )

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port or None,
        )
