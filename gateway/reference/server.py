"""Run the reference API from the config file: `gateway reference-api`."""

from __future__ import annotations

import logging
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from gateway.config import Config, ConfigError, parse_host_port
from gateway.reference.app import Settings, create_app
from gateway.reference.directory import Directory, DirectoryError
from gateway.reference.documents import SigningIdentity


def settings_from_config(config: Config) -> Settings:
    ref = config.reference_api
    try:
        tz = ZoneInfo(ref.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(config.file, "reference_api.timezone", f"unknown time zone {ref.timezone!r}") from None
    try:
        directory = Directory.load(ref.directory)
    except DirectoryError as exc:
        raise ConfigError(config.file, "reference_api.directory", str(exc)) from None
    ref.data_dir.mkdir(parents=True, exist_ok=True)
    return Settings(
        data_dir=ref.data_dir,
        timezone=tz,
        directory=directory,
        signing=SigningIdentity.load_or_create(ref.data_dir, ref.signing_cert, ref.signing_key),
        max_body_bytes=config.limits.max_body_bytes,
    )


def run(config: Config, listen: str | None = None) -> None:
    host, port = parse_host_port(listen or config.reference_api.listen, config.file, "reference_api.listen")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = create_app(settings_from_config(config))
    web.run_app(
        app, host=host, port=port, access_log=None, shutdown_timeout=10,
        print=lambda _: print(f"reference Automation API listening on http://{host}:{port}", flush=True),
    )
