"""The identity token: a short-lived JWT naming the client and its certificate.

The gateway signs one for each client (ES256 with an EC P-256 key, or EdDSA
with an Ed25519 key) and sends it upstream in X-Identity-Token; the reference
API refuses Automation API calls without a valid one, so it cannot be called
around the gateway. A token is reused while more than half its life is left,
which keeps signing off the hot path.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.shell.keys import load_private_key, read_password

ISSUER = "gateway"


def load_or_create_key(path: Path, password: bytes | None = None, file: str | os.PathLike = ""):
    """The private signing key at `path`, created (EC P-256, mode 0600, encrypted with `password` when
    one is given) when missing. SettingsError (identity_token.key) when it cannot be used."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
        return key
    return load_private_key(path, password, file, "identity_token.key", "identity_token.key_password_file")


def configured_key(settings, file: str | os.PathLike):
    """identity_token's key, its passphrase read from key_password_file."""
    password = read_password(settings.key_password_file, file, "identity_token.key_password_file")
    return load_or_create_key(settings.key, password, file)


def _algorithm(key) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name != "secp256r1":
            raise ValueError("must be an EC P-256 or Ed25519 key")
        return "ES256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "EdDSA"
    raise ValueError("must be an EC P-256 or Ed25519 key")


def thumbprint(fingerprint_hex: str) -> str:
    """RFC 8705 x5t#S256: base64url of the certificate's SHA-256."""
    raw = bytes.fromhex(fingerprint_hex.replace(":", ""))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenIssuer:
    def __init__(self, key, audience: str, ttl_s: int, clock: Callable[[], float] = time.time):
        self.key, self.alg = key, _algorithm(key)
        self.audience, self.ttl_s, self.clock = audience, ttl_s, clock
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}

    def token(self, client: str, fingerprint: str) -> str:
        now = self.clock()
        cached = self._cache.get((client, fingerprint))
        if cached and cached[0] - now > self.ttl_s / 2:
            return cached[1]
        exp = now + self.ttl_s
        claims = {
            "iss": ISSUER, "aud": self.audience, "sub": client, "iat": int(now), "nbf": int(now) - 1,
            "exp": int(exp), "jti": str(uuid.uuid4()),
            "cnf": {"x5t#S256": thumbprint(fingerprint)}, "fingerprint_sha256": fingerprint,
        }
        token = jwt.encode(claims, self.key, algorithm=self.alg)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[(client, fingerprint)] = (exp, token)
        return token


class TokenVerifier:
    def __init__(self, public_key, audience: str, leeway_s: float = 5.0):
        self.key, self.alg = public_key, _algorithm(public_key)
        self.audience, self.leeway_s = audience, leeway_s

    def verify(self, token: str | None) -> dict:
        """The token's claims; PermissionError with a short reason when it is missing or invalid."""
        if not token:
            raise PermissionError("an identity token is required")
        try:
            return jwt.decode(
                token, self.key, algorithms=[self.alg], audience=self.audience, issuer=ISSUER,
                leeway=self.leeway_s, options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise PermissionError(f"the identity token is not valid ({type(exc).__name__})") from None
