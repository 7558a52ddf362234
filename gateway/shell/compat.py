"""Where the gateway leans on names aiohttp, asyncio and ssl do not promise to keep.

Each such name is used here and only here, and tests/test_compat.py checks
that it still exists in the installed version (pyproject bounds aiohttp
below 4; Python is 3.11 or newer).
"""

from __future__ import annotations

import ssl
import threading
from asyncio import sslproto
from typing import Callable

import aiohttp.web_response
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from gateway.core.proxy_protocol import Header, ProxyHeaderError, Reader

# aiohttp adds `Server: Python/3.x aiohttp/3.y` to every answer that has none
# (StreamResponse._prepare_headers reads this module global at send time). Software
# versions tell an attacker which advisories to try, so every server in this process
# (front door, admin port, reference API) names itself without one.
SERVER_HEADER = "gateway"


def hide_server_version() -> None:
    aiohttp.web_response.SERVER_SOFTWARE = SERVER_HEADER


hide_server_version()


def presented_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the client sent in the handshake (DER, leaf first); [] when none.

    Not the verified chain: that one holds the CAs OpenSSL took from its own trust store,
    and a per-request check that fed them back in would keep trusting a CA after a reload
    removed it. Public as SSLObject.get_unverified_chain() from Python 3.13; before that,
    the same method exists on the private `_ssl._SSLSocket` behind `SSLObject._sslobj`.
    A resumed session may show no chain (OpenSSL did not receive one).
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is not None:
        return [bytes(c) for c in getter() or ()]
    chain = ssl_object._sslobj.get_unverified_chain()
    return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain or ()]


# -- asyncio's SSL protocol ----------------------------------------------------------------------
#
# asyncio reports a refused handshake nowhere (an SSLError is an OSError, which it logs only in
# debug mode), and gives every connection a 256 KiB receive buffer of its own, allocated and
# zeroed when the connection is made: 1,000 idle connections cost 300 MiB. This subclass
# reports handshake failures, reads the socket into one buffer per thread (the transport calls
# get_buffer, recv_into and buffer_updated in one go, and buffer_updated copies the bytes into
# the connection's MemoryBIO at once, so no connection holds the buffer between reads), and
# lets a gate refuse a connection before its handshake starts.
#
# Behind a TCP load balancer (listen.proxy_protocol), the connection's first bytes are a PROXY
# header: they are read before any byte reaches OpenSSL's MemoryBIO (the base class's handshake
# starts only once the header is whole), under the handshake's time limit, and the client address
# it carries becomes the "peername" extra (the balancer's stays as "proxy_peer").

SOCKET_READ_BYTES = 256 * 1024
_per_thread = threading.local()


def _shared_read_buffer() -> memoryview:
    view = getattr(_per_thread, "view", None)
    if view is None:
        view = _per_thread.view = memoryview(bytearray(SOCKET_READ_BYTES))
    return view


class GatedSSLProtocol(sslproto.SSLProtocol):
    """asyncio's server-side TLS protocol: failures reported, a shared read buffer, a connection gate."""

    # Plaintext read size (one TLS record holds at most 16 KiB), and the size of the buffer the base
    # class allocates in __init__, dropped at once in favour of the shared one.
    max_size = 32 * 1024

    def __init__(self, *args, on_failure: Callable[[BaseException, bytes | None], None],
                 admit: Callable[[], bool], release: Callable[[], None], proxy=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._ssl_buffer = self._ssl_buffer_view = None
        self._on_failure, self._admit, self._release = on_failure, admit, release
        self._admitted = False
        # proxy: None, or what listener.ProxyGate offers: trusts(peername) -> bool, refused(why, peername)
        self._proxy, self._proxy_reader, self._proxy_timer = proxy, None, None
        self._tls_bytes = False

    def get_buffer(self, n):
        self._ssl_buffer_view = _shared_read_buffer()
        return self._ssl_buffer_view

    def connection_made(self, transport):
        if self._proxy is not None and not self._proxy.trusts(transport.get_extra_info("peername")):
            self._proxy.refused("not from an address in listen.trusted_proxies", transport.get_extra_info("peername"))
            transport.abort()  # closed at once, before any handshake
            return
        if not self._admit():
            transport.abort()  # past limits.max_connections: closed at once, before any handshake
            return
        self._admitted = True
        if self._proxy is not None:
            self._transport, self._proxy_reader = transport, Reader()
            self._proxy_timer = self._loop.call_later(self._ssl_handshake_timeout, self._proxy_refuse,
                                                      f"no complete PROXY header within {self._ssl_handshake_timeout:g} s")
            return
        super().connection_made(transport)

    def buffer_updated(self, nbytes):
        if self._proxy_reader is None:
            self._tls_bytes = True
            return super().buffer_updated(nbytes)
        try:
            found = self._proxy_reader.feed(bytes(self._ssl_buffer_view[:nbytes]))
        except ProxyHeaderError as exc:
            return self._proxy_refuse(str(exc))
        if found is not None:
            self._proxy_accept(*found)

    def eof_received(self):
        if self._proxy_reader is not None:
            self._proxy_refuse("closed before a complete PROXY header")
            return None
        return super().eof_received()

    def _proxy_accept(self, header: Header, leftover: bytes) -> None:
        self._proxy_timer.cancel()
        self._proxy_reader = self._proxy_timer = None
        transport = self._transport
        self._extra["proxy_peer"] = transport.get_extra_info("peername")
        if header.source is not None:
            self._extra["peername"] = header.source   # aiohttp's request.remote, the audit line's `remote`
        super().connection_made(transport)             # the TLS handshake starts now
        if leftover and self._transport is not None:
            view = self._ssl_buffer_view = _shared_read_buffer()
            view[:len(leftover)] = leftover
            self.buffer_updated(len(leftover))

    def _proxy_refuse(self, why: str) -> None:
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
        self._proxy_reader = self._proxy_timer = None
        transport = self._transport
        if transport is None:
            return
        self._proxy.refused(why, transport.get_extra_info("peername"))
        transport.abort()  # no TLS alert: no TLS was spoken

    def connection_lost(self, exc):
        if self._proxy_reader is not None:  # reset by the peer in the middle of the header
            self._proxy_timer.cancel()
            self._proxy_reader = self._proxy_timer = None
            self._proxy.refused("closed before a complete PROXY header", self._transport.get_extra_info("peername"))
        if not self._admitted:
            return
        self._admitted = False
        self._release()
        super().connection_lost(exc)

    def _on_handshake_complete(self, handshake_exc):
        if (self._proxy is not None and not self._tls_bytes and isinstance(handshake_exc, type)
                and issubclass(handshake_exc, ConnectionResetError)):
            # a balancer's health check (a PROXY header, v2 LOCAL or not, then nothing): no failed handshake
            return super()._on_handshake_complete(handshake_exc)
        if handshake_exc is None:
            try:
                self._sslobj.getpeercert()
            except Exception as exc:  # what the base class would turn into a failure
                handshake_exc = exc
        if handshake_exc is not None:
            # asyncio passes the class ConnectionResetError, not an instance, when the peer hangs up
            failure = handshake_exc() if isinstance(handshake_exc, type) else handshake_exc
            self._on_failure(failure, presented_certificate(self._sslobj))
            # OpenSSL has written the alert that names the cause (unknown_ca, certificate_expired,
            # ...) into the outgoing buffer, which asyncio drops when it closes (cpython #98078):
            # send it first, so that the client can say why instead of "connection reset".
            try:
                alert = self._outgoing.read()
                if alert and self._transport is not None:
                    self._transport.write(alert)
            except Exception:  # the connection may already be gone: nothing to tell
                pass
        return super()._on_handshake_complete(handshake_exc)

    def _check_handshake_timeout(self):
        if self._state == sslproto.SSLProtocolState.DO_HANDSHAKE:
            self._on_failure(TimeoutError("the TLS handshake took too long"), None)
        return super()._check_handshake_timeout()


def presented_certificate(ssl_object) -> bytes | None:
    """The certificate a client presented in a handshake that failed (DER), where OpenSSL kept it.

    On a failed verification OpenSSL keeps the chain it was building (leaf first) as the
    "verified" chain and no peer chain, so both are asked, public names first (Python 3.13).
    """
    for name in ("get_unverified_chain", "get_verified_chain"):
        try:
            getter = getattr(ssl_object, name, None)
            if getter is not None:
                chain = getter()
                if chain:
                    return bytes(chain[0])
                continue
            chain = getattr(ssl_object._sslobj, name)()
            if chain:
                return chain[0].public_bytes(ssl._ssl.ENCODING_DER)
        except Exception:  # nothing presented, or nothing kept
            continue
    return None


# -- aiohttp's request handler -------------------------------------------------------------------

class BodyFramingError(Exception):
    """The request body's framing broke (a malformed chunk) while the body was being read."""


class ProblemRequestHandler(RequestHandler):
    """aiohttp's request handler, answering requests its parser refused through the gateway's hook.

    Without this, a request aiohttp cannot parse gets a text/plain 400 that is neither
    problem+json nor audited. The hook (`on_http_error` on the web.Server) builds both.
    And when the parser fails in the middle of a body (a malformed chunk in a later
    packet), aiohttp queues the error as a next message but leaves the body being read
    waiting until its timeout; this fails that body at once instead.
    """

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        current = self._current_request
        if current is None or len(self._messages) <= queued:
            return
        error = self._messages[-1][0]
        if isinstance(error, _ErrInfo) and not current.content.is_eof():
            current.content.set_exception(BodyFramingError(error.message))

    def handle_error(self, request, status=500, exc=None, message=None):
        hook = getattr(self._manager, "on_http_error", None)
        if hook is None or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        self.log_debug("refused a malformed request: %s", message)
        response = hook(request, status, message or "")
        response.force_close()
        return response


def problem_request_handler(server) -> RequestHandler:
    """A request handler of `server` (a web.Server) that answers parse errors through its hook."""
    handler = server()
    handler.__class__ = ProblemRequestHandler  # same slots: only handle_error differs
    return handler


# -- aiohttp's client-side protocol pieces, for the upstream pool ----------------------------------
#
# upstream_pool.py reads answers with aiohttp's own response parser (llhttp) on a protocol with
# aiohttp's flow control: BaseProtocol pauses and resumes `_parser` as the transport asks, and
# `_drain_helper()` waits until the transport can take more.

FlowControlledProtocol = BaseProtocol
ResponseParser = HttpResponseParser


def writable(protocol: BaseProtocol):
    """An awaitable that returns once the protocol's transport can take more bytes."""
    return protocol._drain_helper()
