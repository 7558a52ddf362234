"""Shared fixtures: the reference API on a real socket, with a clock the test controls."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.reference.app import Settings, create_app
from gateway.reference.directory import Directory
from gateway.reference.documents import SigningIdentity, sample_pdf

ROOT = Path(__file__).resolve().parent.parent
STOCKHOLM = ZoneInfo("Europe/Stockholm")
FUTURE_DUE = "2099-12-24T00:00:00"

SOLICITOR = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom","attributes":{}}'
SIGNER_INTERNAL = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom","attributes":{}}'
SIGNER_EXTERNAL = (
    '{"source":"EXTERNAL","identifier":"198603052385","attributes":'
    '{"mail":{"value":"anna@example.org"},"mobile":{"value":"+46700000000"}}}'
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float | None = None):
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _operational_log_written():
    """Each test's operational log lines are written (by the log's own thread) before its output is closed."""
    yield
    from gateway.shell import oplog

    oplog.drain(1.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ref_settings(tmp_path) -> Settings:
    data = tmp_path / "data"
    data.mkdir()
    return Settings(
        data_dir=data,
        timezone=STOCKHOLM,
        directory=Directory.load(ROOT / "directory.yaml"),
        signing=SigningIdentity.load_or_create(data),
        max_body_bytes=2 * 1024 * 1024,
    )


@pytest.fixture
async def ref_server(aiohttp_server, ref_settings, clock):
    """The reference API served by aiohttp on a real 127.0.0.1 socket."""
    return await aiohttp_server(create_app(ref_settings, clock=clock))


@pytest.fixture
async def ref(aiohttp_client, ref_server):
    return await aiohttp_client(ref_server)


def order_form(**overrides) -> "aiohttp.FormData":  # noqa: F821
    """A valid create-order form; keyword arguments replace or drop (None) fields."""
    import aiohttp

    fields = {
        "title": "A new signing order",
        "description": "This order was automatically generated",
        "dueDate": FUTURE_DUE,
        "solicitor": SOLICITOR,
        "signers": [SIGNER_INTERNAL, SIGNER_EXTERNAL],
        "upload": sample_pdf(),
    }
    fields.update(overrides)
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bytes):
                form.add_field(name, v, filename="signthisplease.pdf", content_type="application/pdf")
            else:
                form.add_field(name, v)
    return form


async def create_order(client, **overrides) -> str:
    resp = await client.post("/orders", data=order_form(**overrides))
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.content_type == "text/plain"
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, deadline_s: float = 20.0) -> None:
    """Poll `url` until it answers, the process dies, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {deadline_s}s")


def need_programs(*names: str) -> None:
    """The programs a test drives (curl, openssl, ...): when one is missing the test skips and says which,
    except under CI=true, where .ci/run has installed them all and a missing one is a failure."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{', '.join(missing)} not on PATH, and CI=true: .ci/run installs it", pytrace=False)
    pytest.skip(f"{', '.join(missing)} not on PATH", allow_module_level=True)


def gateway_command(*args: str) -> list[str]:
    exe = shutil.which("gateway")
    return [exe, *args] if exe else [sys.executable, "-m", "gateway", *args]


@pytest.fixture
def run_gateway():
    """Start `gateway ...` subprocesses; all are stopped at the end of the test."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            gateway_command(*args), cwd=cwd, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM, wait; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the front door -------------------------------------------------------------


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory):
    from gateway_harness import build_pki

    return build_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def recorder():
    from gateway_harness import RecordingUpstream

    return RecordingUpstream()


@pytest.fixture
async def recorder_url(aiohttp_server, recorder):
    server = await aiohttp_server(recorder.app())
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def gw(tmp_path, test_pki, recorder_url):
    """The gateway in this process, in front of the recording upstream; yields its base URL."""
    from gateway_harness import gateway_running, write_config

    async with gateway_running(write_config(tmp_path, test_pki, recorder_url)) as (url, _):
        yield url
