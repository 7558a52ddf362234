"""The private names of aiohttp, asyncio and ssl the gateway leans on still exist (gateway/compat.py)."""

from __future__ import annotations

import asyncio.sslproto as sslproto
import inspect
import ssl

import aiohttp.web_response
from aiohttp.web_protocol import RequestHandler

from gateway.shell import compat


def test_aiohttp_reads_the_server_header_from_the_name_we_set():
    assert aiohttp.web_response.SERVER_SOFTWARE == compat.SERVER_HEADER
    source = inspect.getsource(aiohttp.web_response.StreamResponse._prepare_headers)
    assert "SERVER_SOFTWARE" in source


def test_the_presented_chain_can_be_read():
    if not hasattr(ssl.SSLObject, "get_unverified_chain"):
        import _ssl

        assert hasattr(_ssl._SSLSocket, "get_unverified_chain") and ssl._ssl.ENCODING_DER == 2


def test_asyncio_ssl_protocol_hooks_of_tls_listener():
    for name in ("_on_handshake_complete", "_check_handshake_timeout"):
        assert callable(getattr(sslproto.SSLProtocol, name))
    assert sslproto.SSLProtocolState.DO_HANDSHAKE
    assert "self._sslobj" in inspect.getsource(sslproto.SSLProtocol._do_handshake)


def test_asyncio_ssl_protocol_names_of_the_proxy_protocol_reader():
    """listen.proxy_protocol: the header is read before the base class's connection_made starts the handshake,
    and the client address it carries is put in the extras the app transport's get_extra_info reads first."""
    init = inspect.getsource(sslproto.SSLProtocol.__init__)
    for name in ("self._extra", "self._loop", "self._ssl_handshake_timeout", "self._transport"):
        assert name in init, name
    assert "self._extra" in inspect.getsource(sslproto.SSLProtocol._get_extra_info)
    assert "_ssl_protocol._get_extra_info" in inspect.getsource(sslproto._SSLProtocolTransport.get_extra_info)
    assert "self._start_handshake()" in inspect.getsource(sslproto.SSLProtocol.connection_made)
    assert "self._on_handshake_complete(ConnectionResetError)" in inspect.getsource(sslproto.SSLProtocol.eof_received)
    assert "self._ssl_buffer_view[:nbytes]" in inspect.getsource(sslproto.SSLProtocol.buffer_updated)


def test_aiohttp_request_handler_error_hook():
    params = inspect.signature(RequestHandler.handle_error).parameters
    assert list(params) == ["self", "request", "status", "exc", "message"]
    assert "_manager" in RequestHandler.__slots__


async def test_aiohttp_flow_control_and_parser_names_of_the_upstream_pool():
    import asyncio

    from aiohttp.base_protocol import BaseProtocol

    from gateway.shell.pool import _Connection

    assert callable(BaseProtocol._drain_helper) and "_parser" in BaseProtocol.__slots__
    conn = _Connection(asyncio.get_running_loop())  # builds aiohttp's response parser as the pool does
    assert conn._parser is conn.parser


def test_the_multipart_reader_asks_of_its_stream_only_what_the_spool_stream_has():
    """gateway/multipart.py feeds aiohttp's MultipartReader a spool instead of a StreamReader."""
    import re

    import aiohttp.multipart

    from gateway.shell.body import SpoolStream

    called = set(re.findall(r"self\._content\.(\w+)\(", inspect.getsource(aiohttp.multipart)))
    assert called and called <= {name for name in dir(SpoolStream) if not name.startswith("__")}, called


def test_the_request_handler_names_the_error_hook_relies_on():
    from aiohttp.web_protocol import _ErrInfo

    assert {"_messages", "_current_request"} <= set(RequestHandler.__slots__)
    assert {"status", "message"} <= set(inspect.signature(_ErrInfo).parameters)


def test_the_tls_protocol_names_the_shared_buffer_relies_on():
    source = inspect.getsource(sslproto.SSLProtocol.buffer_updated)
    assert "self._ssl_buffer_view[:nbytes]" in source
    assert "self._outgoing" in inspect.getsource(sslproto.SSLProtocol.__init__)
