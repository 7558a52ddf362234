"""The private names of aiohttp, asyncio and ssl the gateway leans on still exist (gateway/compat.py)."""

from __future__ import annotations

import asyncio.sslproto as sslproto
import inspect
import ssl

import aiohttp.web_response
from aiohttp.web_protocol import RequestHandler

from gateway import compat


def test_aiohttp_reads_the_server_header_from_the_name_we_set():
    assert aiohttp.web_response.SERVER_SOFTWARE == compat.SERVER_HEADER
    source = inspect.getsource(aiohttp.web_response.StreamResponse._prepare_headers)
    assert "SERVER_SOFTWARE" in source


def test_the_verified_chain_can_be_read():
    if not hasattr(ssl.SSLObject, "get_verified_chain"):
        import _ssl

        assert hasattr(_ssl._SSLSocket, "get_verified_chain") and ssl._ssl.ENCODING_DER == 2


def test_asyncio_ssl_protocol_hooks_of_tls_listener():
    for name in ("_on_handshake_complete", "_check_handshake_timeout"):
        assert callable(getattr(sslproto.SSLProtocol, name))
    assert sslproto.SSLProtocolState.DO_HANDSHAKE
    assert "self._sslobj" in inspect.getsource(sslproto.SSLProtocol._do_handshake)


def test_aiohttp_request_handler_error_hook():
    params = inspect.signature(RequestHandler.handle_error).parameters
    assert list(params) == ["self", "request", "status", "exc", "message"]
    assert "_manager" in RequestHandler.__slots__
