"""The README's shell blocks, run as a new user runs them: against `gateway serve` on the committed config.

Each block runs in bash, in a copy of the files the committed config.yaml names, with the gateway
serving them on their committed ports. The HTTP statuses the block prints must be those its comments
promise (`# -> 200`), in order. The watch period is shortened to 1 s in the copy, and the block's
waits with it, so that the recipe's pickups take seconds rather than half a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import gateway_command, need_programs, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
PORTS = (8443, 9102, 8081)

need_programs("curl", "openssl")


def promised(block: str) -> list[str]:
    return re.findall(r"# .*-> (\d{3})\s*$", block, re.M)


def printed(output: str) -> list[str]:
    return re.findall(r"^(\d{3})$", output, re.M)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port}, which the committed config.yaml uses, is taken")
    folder = tmp_path_factory.mktemp("readme")
    for name in ("config.yaml", "directory.yaml"):
        shutil.copy(ROOT / name, folder / name)
    for name in ("certs.example", "policies", "schema"):
        shutil.copytree(ROOT / name, folder / name)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["reload"] = {"watch_s": 1}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(gateway_command("serve"), cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_http("http://127.0.0.1:9102/readyz", proc, deadline_s=40)
        yield folder
    finally:
        stop_process(proc)


def run_block(block: str, folder: Path) -> str:
    # the watch period is 1 s here, not 5: waits for a pickup shrink with it, and the pause between the
    # two files of a rotation stays well inside one period
    block = re.sub(r"\bsleep (\d+)\b", lambda m: "sleep " + ("0.2" if m.group(1) == "1" else str(
        max(2, round(int(m.group(1)) / 3)))), block)
    bin_dir = str(Path(gateway_command("serve")[0]).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-c", block], cwd=folder, capture_output=True, text=True, timeout=180, env=env)
    return proc.stdout + proc.stderr


def test_the_readme_shows_the_virtualenv_and_the_two_commands():
    text = (ROOT / "README.md").read_text()
    for line in ("python -m venv .venv && . .venv/bin/activate",
                 "python -m pip install -e . && gateway serve",
                 "python -m pip install -e '.[test]' && python -m pytest"):
        assert line in text, line
    assert len(BLOCKS) == 2


def test_the_quick_start(served):
    output = run_block(BLOCKS[0], served)
    assert printed(output) == promised(BLOCKS[0]), output
    assert "Warning" not in output and "Traceback" not in output, output
    assert (served / "signed.pdf").read_bytes().startswith(b"%PDF-")


def test_onboarding_revocation_and_rotation(served):
    started = time.monotonic()
    output = run_block(BLOCKS[1], served)
    assert printed(output) == promised(BLOCKS[1]), output
    assert re.search(r"^\d+ passed, 0 failed$", output, re.M) and "\nOK\n" in output, output
    assert "certificate revoked" in output, output
    serials = re.findall(r"^serial=([0-9A-F]+)$", output, re.M)
    assert len(serials) == 2 and serials[0] == serials[1], output        # the new server certificate serves
    assert 'gateway_config_reloads_total{result="error"} 0.0' in output, output
    assert time.monotonic() - started < 60
