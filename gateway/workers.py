"""`gateway serve --workers N`: N gateway processes sharing the listening port.

Each worker binds the port with SO_REUSEPORT, so the kernel spreads new
connections between them. The parent starts the embedded upstream once,
passes SIGHUP and SIGTERM on to the workers, restarts a worker that dies
(and the embedded upstream, see embedded.py),
and exits when they have all stopped. Worker i has the admin port
admin.port + i and writes its own audit chain (audit.path + ".w<i>"). In-memory
rate limits would give every worker limits of its own, so with rate limits
more than one worker needs the Redis storage.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from gateway.config import Config
from gateway.oplog import event
from gateway.policy import PolicyError, load_policies


class WorkersError(Exception):
    """The workers cannot be started as configured."""


def check_workers(config: Config, workers: int) -> None:
    if workers < 1:
        raise WorkersError("--workers must be at least 1")
    if workers == 1:
        return
    try:
        policies = load_policies(config.policies)
    except PolicyError as exc:
        raise WorkersError(str(exc)) from None
    limited = [p.client for p in policies.policies if p.rate_limit.client or p.rate_limit.operations]
    if limited and config.rate_limit.storage == "memory":
        raise WorkersError(
            f"--workers {workers} with rate limits (clients {', '.join(limited)}) needs rate_limit.storage: "
            "redis://...; with memory storage each worker would keep limits of its own")


def _spawn(config: Config, index: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config.file),
                             "--worker-index", str(index)])


def run_workers(config: Config, workers: int) -> None:
    from gateway.embedded import EmbeddedReference, EmbeddedStartError
    from gateway.server import StartError

    try:
        check_workers(config, workers)
    except WorkersError as exc:
        raise StartError(str(exc)) from None
    reference = EmbeddedReference(config) if config.upstream.url == "embedded" else None
    if reference is not None:
        try:
            reference.start()
        except EmbeddedStartError as exc:
            raise StartError(str(exc)) from None
    procs = {i: _spawn(config, i) for i in range(workers)}
    stopping = False

    def forward(sig, _frame):
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    event("workers", count=workers)
    try:
        while procs:
            time.sleep(0.1)
            if reference is not None and not stopping:
                reference.tick()  # reap and restart the embedded upstream when it exits
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                if stopping:
                    del procs[i]
                elif code == 1:  # could not start (bad config, port): do not loop on it
                    stopping = True
                    forward(signal.SIGTERM, None)
                    del procs[i]
                else:
                    event("worker_restart", worker=i, exit_code=code)
                    procs[i] = _spawn(config, i)
    finally:
        if reference is not None:
            reference.stop()
