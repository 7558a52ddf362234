"""Private keys on disk, encrypted or not, and the files holding their passphrases.

A key encrypted at rest needs its passphrase from a file (`tls.key_password_file`,
`identity_token.key_password_file`), never from a terminal: OpenSSL asks on the
controlling terminal when it meets an encrypted key without one, which would hang
`gateway check` and a service's start. Every problem is one SettingsError naming
the config key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from gateway.core.errors import SettingsError


def read_password(path: Path | None, file: str | os.PathLike, key: str) -> bytes | None:
    """The passphrase in `path` (its trailing line break dropped), or None when no file is set."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(file, key, f"cannot read {path}: {exc.strerror or exc}") from None
    password = data.rstrip(b"\r\n")
    if not password:
        raise SettingsError(file, key, f"{path} is empty")
    return password


def readable_by_others(path: Path | None) -> bool:
    """Whether a secret's file can be read by its group or by anyone (for `gateway check`'s warning)."""
    try:
        return path is not None and bool(Path(path).stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def load_private_key(path: Path, password: bytes | None, file: str | os.PathLike, key: str,
                     password_key: str | None):
    """The private key at `path`, decrypted with `password` when it is encrypted (`password_key`: the
    config key of its passphrase file, None when it has none)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(file, key, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return serialization.load_pem_private_key(data, password=password)
    except TypeError:
        if password is None:
            raise _encrypted(path, file, key, password_key) from None
        return serialization.load_pem_private_key(data, password=None)  # not encrypted: the file is not needed
    except UnsupportedAlgorithm:
        raise SettingsError(file, key, f"{path} holds a kind of key this gateway cannot use") from None
    except ValueError:
        if password is not None and b"ENCRYPTED" in data:
            raise SettingsError(file, key, f"{path} cannot be decrypted with the passphrase in {password_key} "
                                           "(a wrong passphrase?)") from None
        raise SettingsError(file, key, f"{path} is not a PEM private key") from None


def password_callback(password: bytes | None, path: Path, file: str | os.PathLike, key: str,
                      password_key: str | None):
    """For ssl's load_cert_chain: the passphrase, or a one-line error instead of OpenSSL's prompt."""
    def give() -> bytes:
        if password is None:
            raise _encrypted(path, file, key, password_key)
        return password
    return give


def _encrypted(path: Path, file: str | os.PathLike, key: str, password_key: str | None) -> SettingsError:
    if password_key is None:  # a key with no passphrase file of its own
        return SettingsError(file, key, f"{path} is encrypted: {key} must be an unencrypted key "
                                        "(readable by the gateway's user only)")
    return SettingsError(file, key, f"{path} is encrypted: set {password_key} to a file holding its passphrase")
