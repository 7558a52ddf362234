"""What a reload may change, and how a change on disk is noticed without a signal.

SIGHUP and the file watcher (`reload.watch_s`) re-read config.yaml. The keys
below take effect at once; a change to any other key is logged as needing a
restart and the running value is kept, so that a reload never half-applies
(say, a new listen port that nothing listens on).

Certificates and CRLs are rotated by tools that replace files, often by
swapping a symlink, and that send no signal: the watcher reads the watched
files (through symlinks) and reloads when their bytes change.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from gateway.shell.settings import Config

# Dotted keys (or whole sections) a reload applies.
RELOADABLE = ("tls", "policies", "reload", "limits.max_body_bytes", "limits.request_timeout_s",
              "limits.drain_timeout_s", "rate_limit.on_storage_error")
# ... except these, read once by long-lived services (the revocation fetcher and its cache)
RESTART_ONLY = ("tls.revocation",)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.name == "file":
                continue
            out.update(_flat(getattr(value, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: value}


def _reloadable(key: str) -> bool:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(key == r or key.startswith(r + ".") for r in prefixes)
    return under(RELOADABLE) and not under(RESTART_ONLY)


def merge(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run now: `new`'s reloadable keys over `running`; (it, applied keys, keys needing a restart)."""
    old_flat, new_flat = _flat(running), _flat(new)
    changed = sorted(k for k in set(old_flat) | set(new_flat) if old_flat.get(k) != new_flat.get(k))
    applied = [k for k in changed if _reloadable(k)]
    restart = [k for k in changed if not _reloadable(k)]
    sections = {}
    for section in ("tls", "reload", "limits", "rate_limit"):
        old_part, new_part = getattr(running, section), getattr(new, section)
        if section == "reload":
            sections[section] = new_part
        elif section == "tls":   # all but its restart-only part
            sections[section] = dataclasses.replace(new_part, revocation=old_part.revocation)
        else:
            sections[section] = dataclasses.replace(old_part, **{
                f.name: getattr(new_part, f.name) for f in dataclasses.fields(old_part)
                if _reloadable(f"{section}.{f.name}")})
    merged = dataclasses.replace(running, policies=new.policies, **sections)
    return merged, applied, restart


def watched_files(config: Config) -> list[Path]:
    """The files a reload reads: config.yaml, the TLS files, every policy file."""
    files = [config.file]
    tls = config.tls
    files += [p for p in (tls.cert, tls.key, tls.key_password_file, tls.client_ca, tls.crl) if p is not None]
    if config.policies.is_dir():
        files += sorted(config.policies.glob("*.yaml"))
    return files


def fingerprint(config: Config) -> str:
    """A digest of the watched files' names and bytes (a missing file counts as a change too)."""
    digest = hashlib.sha256()
    for path in watched_files(config):
        digest.update(str(path).encode() + b"\0")
        try:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()
