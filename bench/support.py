"""What the benchmarks share: free ports, client TLS, readiness polls, stopping servers, bench/gateway.py."""

from __future__ import annotations

import importlib.util
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_ssl(pki_dir: Path, client: str) -> ssl.SSLContext:
    """A client TLS context trusting the PKI's CA and presenting clients/CLIENT.crt."""
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(pki_dir / "clients" / f"{client}.crt"), str(pki_dir / "clients" / f"{client}.key"))
    return ctx


def poll_ready(name: str, proc: subprocess.Popen | None, probe: Callable[[], None], deadline_s: float,
               log: Path | None = None) -> None:
    """Call probe() until it returns without OSError; RuntimeError if the process exits or time runs out."""
    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""

    deadline, delay = time.monotonic() + deadline_s, 0.02
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail()}")
        try:
            probe()
            return
        except OSError:
            pass
        time.sleep(delay)  # back-off between polls, not a fixed wait for readiness
        delay = min(delay * 2, 0.5)
    raise RuntimeError(f"{name} not ready within {deadline_s:.0f}s:\n{tail()}")


def stop(proc: subprocess.Popen | None, timeout_s: float = 15) -> None:
    """SIGTERM, wait; SIGKILL if it hangs."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_gateway():
    """bench/gateway.py as a module (its upstream, its config, its load runner): imported by path,
    because its name is the gateway package's."""
    spec = importlib.util.spec_from_file_location("bench_gateway", Path(__file__).resolve().parent / "gateway.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
