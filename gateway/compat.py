"""Where the gateway leans on names aiohttp and Python's ssl do not promise to keep.

Each such name is used here and only here, and tests/test_compat.py checks
that it still exists in the installed version (pyproject bounds aiohttp
below 4). asyncio's SSL protocol hooks live in tls_listener.py and are
checked by the same test.
"""

from __future__ import annotations

import ssl

import aiohttp.web_response

# aiohttp adds `Server: Python/3.x aiohttp/3.y` to every answer that has none
# (StreamResponse._prepare_headers reads this module global at send time). Software
# versions tell an attacker which advisories to try, so every server in this process
# (front door, admin port, reference API) names itself without one.
SERVER_HEADER = "gateway"


def hide_server_version() -> None:
    aiohttp.web_response.SERVER_SOFTWARE = SERVER_HEADER


hide_server_version()


def verified_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The client's chain as OpenSSL verified it in the handshake (DER, leaf first); [] when none.

    Public as SSLObject.get_verified_chain() from Python 3.13; before that, the same
    method exists on the private `_ssl._SSLSocket` behind `SSLObject._sslobj`. A resumed
    session has no verified chain (OpenSSL did not verify anything).
    """
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is not None:
        return list(getter() or [])
    chain = ssl_object._sslobj.get_verified_chain()
    return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain or ()]
