"""The embedded reference API: a supervised child process, reached over HTTP like any upstream.

`gateway serve` with `upstream.url: embedded` starts `gateway reference-api` and
keeps it running: when the child exits, for whatever reason, it is reaped at
once (no zombie), restarted after a back-off (0.5 s, doubling to 10 s while it
keeps dying, back to 0.5 s once it has stayed up 10 s), and each exit and
restart is logged and counted. Requests meanwhile get a prompt 502: nothing
listens on the port, so the connection is refused.

`supervise()` runs in the gateway's event loop (or the `--workers` parent's): every
0.1 s `tick()` reaps and restarts without blocking, and every 5 s a health probe
checks that the child still answers; a child that misses three probes in a row
(hung, stopped) is killed and restarted like one that exited. The child sets
PR_SET_PDEATHSIG on itself, so it dies with the gateway even when the gateway
is killed, and the gateway refuses to start when something already serves
`reference_api.listen` (it would be an upstream nobody supervises).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

from gateway.core.errors import StartError
from gateway.shell.settings import Config, parse_host_port
from gateway.shell.oplog import event

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
TICK_S = 0.1
PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 2.0
UNANSWERED_PROBES = 3

PR_SET_PDEATHSIG = 1


PARENT_ENV = "GATEWAY_SUPERVISOR_PID"


def die_with_parent() -> None:
    """In the child, first thing (`gateway reference-api` does it when PARENT_ENV names its supervisor):
    SIGTERM when the gateway dies, even by SIGKILL, so that no child outlives it. Done in the child itself,
    not in a preexec_fn, which is unsafe in a process with threads."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the gateway's own stop() is what ends the child
        return
    if os.getppid() != int(parent):  # the gateway died before the signal was asked for
        sys.exit(0)


async def supervise(reference: "EmbeddedReference") -> None:
    """Reap and restart the child whenever it exits (tick), and kill it when it stops answering (probe)."""
    next_probe = time.monotonic() + PROBE_EVERY_S
    while True:
        reference.tick()
        if time.monotonic() >= next_probe:
            next_probe = time.monotonic() + PROBE_EVERY_S
            reference.probed(await reference.probe())
        await asyncio.sleep(TICK_S)



class Backoff:
    """The wait before a restart: doubles while the child keeps dying, resets once it stays up."""

    def __init__(self, first: float = MIN_BACKOFF_S, most: float = MAX_BACKOFF_S):
        self.first, self.most, self.next = first, most, first

    def take(self) -> float:
        wait, self.next = self.next, min(self.next * 2, self.most)
        return wait

    def ran_for(self, seconds: float) -> None:
        if seconds >= self.most:
            self.next = self.first


class EmbeddedReference:
    def __init__(self, config: Config, on_restart: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.on_restart, self.clock = config, on_restart, clock
        host, port = parse_host_port(config.reference_api.listen, config.file, "reference_api.listen")
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.backoff = Backoff()
        self._started_at = 0.0
        self._restart_at: float | None = None
        self._stopping = False
        self._failed_probes = 0

    def _spawn(self) -> None:
        """Start the child; it asks the kernel to end it with this process (die_with_parent)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "reference-api", "-c", str(self.config.file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, PARENT_ENV: str(os.getpid())},
        )
        self._started_at = self.clock()
        self._failed_probes = 0

    def spawn_first(self) -> None:
        """The first start, part one (in the loop's thread): refuse a port something else already serves."""
        host, port = parse_host_port(self.config.reference_api.listen, self.config.file, "reference_api.listen")
        try:
            with socket.create_connection((host, port), timeout=1):
                pass
        except OSError:
            pass  # nothing listens: the port is ours to take
        else:
            raise StartError(f"{self.config.file}: reference_api.listen: {host}:{port} is already in use "
                             "(an embedded API left by a gateway that did not stop cleanly?); "
                             "the gateway would be talking to a process it does not supervise")
        self._spawn()

    def start(self, deadline_s: float = 30.0) -> None:
        """The first start: spawn (unless spawn_first did) and wait until it answers, or raise StartError."""
        if self.proc is None:
            self.spawn_first()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() or "").strip().splitlines()
                raise StartError(f"the embedded reference API did not start: {err[-1] if err else 'exited'}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    self._pass_stderr_on(self.proc)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise StartError(f"the embedded reference API did not answer on {self.url} within {deadline_s:.0f}s")

    def probed(self, answered: bool) -> None:
        """The result of a health probe of the running child; three misses in a row and it is killed
        (a hung child answers nobody and never exits), which tick() then treats as any exit."""
        if self._stopping or self.proc is None or self._restart_at is not None:
            return
        self._failed_probes = 0 if answered else self._failed_probes + 1
        if self._failed_probes >= UNANSWERED_PROBES and self.proc.poll() is None:
            event("upstream_unresponsive", pid=self.proc.pid, probes=self._failed_probes,
                  detail="the embedded reference API stopped answering; it is killed and restarted")
            self.proc.kill()
            self._failed_probes = 0

    async def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """GET /healthz of the child: True when it answers at all."""
        host, port = parse_host_port(self.config.reference_api.listen, self.config.file, "reference_api.listen")
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: embedded\r\nConnection: close\r\n\r\n")
                    return (await reader.readline()).startswith(b"HTTP/1.")
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False

    @staticmethod
    def _pass_stderr_on(proc: subprocess.Popen) -> None:
        """Pass the child's stderr on to the operational log, a line an `upstream_stderr` event, so that
        its pipe never fills and blocks it (and a stalled stdout blocks neither it nor the gateway)."""
        def copy() -> None:
            for line in proc.stderr:
                event("upstream_stderr", pid=proc.pid, line=line.rstrip("\n"))

        threading.Thread(target=copy, name="reference-api-stderr", daemon=True).start()

    def tick(self) -> None:
        """Reap the child if it exited; restart it once its back-off has passed. Never blocks."""
        if self._stopping or self.proc is None:
            return
        now = self.clock()
        if self._restart_at is None:
            code = self.proc.poll()  # reaps it
            if code is None:
                self.backoff.ran_for(now - self._started_at)
                return
            wait = self.backoff.take()
            self._restart_at = now + wait
            event("upstream_exited", pid=self.proc.pid, exit_code=code, restart_in_s=wait,
                  detail="the embedded reference API exited; requests get 502 until it is back")
            return
        if now >= self._restart_at:
            self._restart_at = None
            self._spawn()
            self._pass_stderr_on(self.proc)
            self.restarts += 1
            self.on_restart()
            event("upstream_restarted", pid=self.proc.pid, restarts=self.restarts)

    def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
