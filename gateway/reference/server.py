"""Run the reference API from the config file: `gateway reference-api`."""

from __future__ import annotations

import logging
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from cryptography.hazmat.primitives import serialization

from gateway.shell import compat  # noqa: F401  (no software versions in any answer)
from gateway.core.errors import SettingsError
from gateway.shell.settings import Config, parse_host_port
from gateway.core.headers import IDENTITY_TOKEN_HEADER
from gateway.shell.token import TokenVerifier, configured_key
from gateway.reference.app import Settings, create_app
from gateway.reference.directory import Directory, DirectoryError
from gateway.reference.documents import SigningIdentity
from gateway.reference.ldap_directory import LdapDirectory, is_ldap_url
from gateway.reference.store import private_folder


def settings_from_config(config: Config) -> Settings:
    ref = config.reference_api
    try:
        tz = ZoneInfo(ref.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(config.file, "reference_api.timezone", f"unknown time zone {ref.timezone!r}") from None
    try:
        directory = _directory(ref)
    except DirectoryError as exc:
        raise SettingsError(config.file, "reference_api.directory", str(exc)) from None
    private_folder(ref.data_dir)
    return Settings(
        verify_token=_token_check(config),
        data_dir=ref.data_dir,
        timezone=tz,
        directory=directory,
        signing=SigningIdentity.load_or_create(ref.data_dir, ref.signing_cert, ref.signing_key),
        max_body_bytes=config.limits.max_body_bytes,
    )


def _directory(ref) -> Directory | LdapDirectory:
    """The YAML file, or the LDAP directory (reached at each look-up: its absence now does not stop a start)."""
    if not is_ldap_url(ref.directory):
        return Directory.load(None if ref.directory is None else Path(ref.directory))
    password = None
    if ref.ldap.password_file is not None:
        try:
            password = ref.ldap.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise DirectoryError(f"reference_api.ldap.password_file: cannot read: {exc.strerror or exc}") from None
    try:
        return LdapDirectory(ref.directory, ref.ldap.bind_dn, password, ref.ldap.ca, ref.ldap.timeout_s)
    except ValueError as exc:
        raise DirectoryError(str(exc)) from None


def _token_check(config: Config):
    """When identity_token is configured, Automation API calls need a valid token (else 401)."""
    if config.identity_token is None:
        return None
    key_file = config.reference_api.identity_token_public_key
    try:
        if key_file is not None:
            public = serialization.load_pem_public_key(key_file.read_bytes())
        elif config.identity_token.key is not None:
            public = configured_key(config.identity_token, config.file).public_key()
        else:
            raise SettingsError(config.file, "identity_token.key", "is required")
        verifier = TokenVerifier(public, config.identity_token.audience)
    except (OSError, ValueError) as exc:
        raise SettingsError(config.file, "identity_token.key", str(exc)) from None

    def check(request: web.Request) -> None:
        verifier.verify(request.headers.get(IDENTITY_TOKEN_HEADER))

    return check


def run(config: Config, listen: str | None = None) -> None:
    host, port = parse_host_port(listen or config.reference_api.listen, config.file, "reference_api.listen")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = create_app(settings_from_config(config))
    web.run_app(
        app, host=host, port=port, access_log=None, shutdown_timeout=10,
        print=lambda _: print(f"reference Automation API listening on http://{host}:{port}", flush=True),
    )
