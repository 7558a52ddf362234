"""The embedded reference API: a supervised child process, reached over HTTP like any upstream.

`gateway serve` with `upstream.url: embedded` starts `gateway reference-api` and
keeps it running: when the child exits, for whatever reason, it is reaped at
once (no zombie), restarted after a back-off (0.5 s, doubling to 10 s while it
keeps dying, back to 0.5 s once it has stayed up 10 s), and each exit and
restart is logged and counted. Requests meanwhile get a prompt 502: nothing
listens on the port, so the connection is refused.

`tick()` is the whole supervisor: it is called every 0.1 s by the gateway's
event loop, or by the `--workers` parent's loop, and never blocks.
"""

from __future__ import annotations

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

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "reference-api", "-c", str(self.config.file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._started_at = self.clock()

    def start(self, deadline_s: float = 30.0) -> None:
        """The first start: wait until it answers, or raise StartError with its last words."""
        self._spawn()
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

    @staticmethod
    def _pass_stderr_on(proc: subprocess.Popen) -> None:
        """Copy the child's stderr to ours, so that its pipe never fills and blocks it."""
        def copy() -> None:
            for line in proc.stderr:
                sys.stderr.write(line)

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
