"""TLS to an https:// upstream: the client context made from `upstream.ca`, `.cert`, `.key` and
`.server_name`, and why a connection to the upstream failed, in words an operator can act on.

The upstream is verified by default (its certificate must chain to `upstream.ca`, else to the
system's trust store, and name `upstream.server_name`, else the URL's host), over TLS 1.2 or later.
The context is built once, at start: like `upstream.url`, these keys take effect on a restart.
"""

from __future__ import annotations

import re
import ssl

from gateway.core.errors import SettingsError
from gateway.shell.keys import load_private_key, password_callback
from gateway.shell.settings import Config
from gateway.shell.tls import _check_pair

_OPENSSL_WHERE = re.compile(r"\s*\(_ssl\.c:\d+\)$")
# alerts an upstream sends about the client certificate it was given, or not given
_CLIENT_CERT_ALERTS = ("certificate required", "alert bad certificate", "alert unknown ca",
                       "alert certificate unknown", "alert certificate expired", "alert certificate revoked",
                       "alert unsupported certificate", "alert access denied")


def upstream_context(config: Config) -> ssl.SSLContext | None:
    """The client context for an https:// upstream (None for http:// and embedded); SettingsError naming
    the key when a file cannot be used."""
    up, file = config.upstream, config.file
    if not up.url.startswith("https://"):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies by default; said again below, on purpose
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    if up.ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        try:
            ctx.load_verify_locations(cafile=str(up.ca))
        except ssl.SSLError:
            raise SettingsError(file, "upstream.ca", f"{up.ca} holds no usable CA certificate") from None
        except FileNotFoundError:
            raise SettingsError(file, "upstream.ca", f"{up.ca} does not exist") from None
        except OSError as exc:
            raise SettingsError(file, "upstream.ca", f"cannot read {up.ca}: {exc.strerror or exc}") from None
    if up.cert is not None and up.key is not None:
        # no passphrase file for this key: an encrypted one is a one-line error here, never OpenSSL's prompt
        private = load_private_key(up.key, None, file, "upstream.key", None)
        _check_pair(config, up.cert, private, "upstream")
        try:
            ctx.load_cert_chain(up.cert, up.key,
                                password=password_callback(None, up.key, file, "upstream.key", None))
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(file, "upstream.cert/upstream.key",
                                f"{up.cert} and {up.key} cannot be used together ({exc.__class__.__name__})") from None
    return ctx


def connect_failure(exc: BaseException) -> str:
    """Why talking to the upstream failed, for the operational log and /readyz: the TLS verification
    message ("certificate verify failed: unable to get local issuer certificate", "Hostname mismatch,
    ...") or the alert the upstream sent, not just an exception's class."""
    if isinstance(exc, ssl.SSLCertVerificationError):  # the gateway refused the upstream's certificate
        return f"TLS handshake: certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        text = _OPENSSL_WHERE.sub("", exc.strerror or str(exc))
        if any(alert in text for alert in _CLIENT_CERT_ALERTS):
            return (f"TLS handshake: the upstream refused the gateway's client certificate or its lack ({text}); "
                    "see upstream.cert and upstream.key")
        if "alert handshake failure" in text:  # what OpenSSL sends for a missing client certificate under TLS 1.2
            return (f"TLS handshake: the upstream refused it ({text}): does it want a client certificate "
                    "(upstream.cert, upstream.key), or share no TLS version or cipher with the gateway?")
        return f"TLS: {text}"
    if isinstance(exc, OSError) and exc.errno is None and str(exc):
        return str(exc)   # a message of the gateway's own (the pool's ConnectionBroken)
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
