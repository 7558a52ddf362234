"""`gateway serve --workers N`: N gateway processes sharing the listening port, one admin port.

Each worker binds the port with SO_REUSEPORT, so the kernel spreads new
connections between them. The parent starts (and supervises) the embedded
upstream once, passes SIGHUP and SIGTERM on to the workers, restarts a worker
that dies, and exits when they have all stopped.

Monitoring sees one target: the parent serves the admin port. Workers write
their metrics through prometheus_client's multiprocess mode into a folder of
the parent's, and `/metrics` adds them up; each worker also writes its
readiness there, and `/readyz` is 200 only when every worker is ready. Worker
i writes its own audit chain (audit.path + ".w<i>"). In-memory rate limits
would give every worker limits of its own, so with rate limits more than one
worker needs the Redis storage.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.shell.settings import Config
from gateway.shell.oplog import event
from gateway.core.errors import SettingsError, StartError
from gateway.shell.settings import load_policies

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY_EVERY_S = 2.0      # how often a worker writes its readiness
READY_STALE_S = 3 * READY_EVERY_S



def check_workers(config: Config, workers: int) -> None:
    if workers < 1:
        raise StartError("--workers must be at least 1")
    if workers == 1:
        return
    try:
        policies = load_policies(config.policies)
    except SettingsError as exc:
        raise StartError(str(exc)) from None
    limited = [p.client for p in policies.policies if p.rate_limit.client or p.rate_limit.operations]
    if limited and config.rate_limit.storage == "memory":
        raise StartError(
            f"--workers {workers} with rate limits (clients {', '.join(limited)}) needs rate_limit.storage: "
            "redis://...; with memory storage each worker would keep limits of its own")


def prepare_multiprocess_metrics() -> Path:
    """A fresh folder for the workers' metrics, named in the environment before prometheus_client loads."""
    if "prometheus_client" in sys.modules:  # its value class is chosen when it is first imported
        raise StartError("internal: prometheus_client was loaded before its multiprocess folder was set")
    folder = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def ready_file(index: int) -> Path | None:
    folder = os.environ.get(MULTIPROC_ENV)
    return Path(folder) / f"ready-w{index}.json" if folder else None


def write_readiness(index: int, problems: dict[str, str]) -> None:
    """A worker's readiness, for the parent's /readyz (written whole: temp file, then rename)."""
    path = ready_file(index)
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ts": time.time(), "ready": not problems, "problems": problems}))
    os.replace(tmp, path)


def workers_readiness(indexes: list[int], now: float) -> dict[str, str]:
    """What keeps the workers from being ready, by worker; empty when all are."""
    problems = {}
    for i in indexes:
        path = ready_file(i)
        try:
            state = json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            state = None
        if state is None:
            problems[f"worker {i}"] = "has not reported yet"
        elif now - state.get("ts", 0) > READY_STALE_S:
            problems[f"worker {i}"] = "has not reported for a while"
        elif not state.get("ready"):
            problems[f"worker {i}"] = "; ".join(f"{k}: {v}" for k, v in state.get("problems", {}).items())
    return problems


def _spawn(config: Config, index: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config.file),
                             "--worker-index", str(index)])


def run_workers(config: Config, workers: int, metrics_dir: Path) -> None:
    try:
        check_workers(config, workers)
    except StartError as exc:
        raise StartError(str(exc)) from None
    try:
        asyncio.run(_parent(config, workers))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _parent(config: Config, workers: int) -> None:
    from aiohttp import web
    from prometheus_client import multiprocess

    from gateway.runtime.admin import parent_admin_app
    from gateway.runtime.embedded import EmbeddedReference, supervise
    from gateway.shell import oplog
    from gateway.shell.metrics import Metrics
    metrics = Metrics()
    oplog.writer.on_drop = metrics.log_dropped.inc
    reference = None
    if config.upstream.url == "embedded":
        reference = EmbeddedReference(config, on_restart=metrics.upstream_restarts.inc)
        try:
            reference.spawn_first()  # from this thread: the child's death signal is tied to it
            await asyncio.get_running_loop().run_in_executor(None, reference.start)
        except StartError as exc:
            raise StartError(str(exc)) from None
    procs = {i: _spawn(config, i) for i in range(workers)}
    admin = web.AppRunner(parent_admin_app(lambda: workers_readiness(sorted(procs), time.time())),
                          access_log=None, handle_signals=False)
    await admin.setup()
    try:
        await web.TCPSite(admin, config.admin.host, config.admin.port).start()
    except OSError as exc:
        for proc in procs.values():
            proc.terminate()
        if reference is not None:
            reference.stop()
        await admin.cleanup()
        raise StartError(f"cannot listen on the admin port: {exc.strerror or exc}") from None
    stopping = False
    loop = asyncio.get_running_loop()

    def forward(sig: int) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)
    event("workers", count=workers, admin=f"http://{config.admin.host}:{config.admin.port}")
    supervisor = asyncio.create_task(supervise(reference)) if reference is not None else None
    try:
        while procs:
            await asyncio.sleep(0.1)
            if supervisor is not None and stopping:
                supervisor.cancel()  # the embedded upstream is not restarted while the workers stop
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                multiprocess.mark_process_dead(proc.pid)  # its live gauges no longer count
                if stopping:
                    del procs[i]
                elif code == 1:  # could not start (bad config, port): do not loop on it
                    stopping = True
                    forward(signal.SIGTERM)
                    del procs[i]
                else:
                    event("worker_restart", worker=i, exit_code=code)
                    procs[i] = _spawn(config, i)
    finally:
        if supervisor is not None:
            supervisor.cancel()
        await admin.cleanup()
        if reference is not None:
            reference.stop()
