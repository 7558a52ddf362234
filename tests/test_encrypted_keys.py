"""Keys encrypted at rest: their passphrase comes from a file, never from a prompt on the terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import gateway_command, need_programs
from gateway.core.errors import SettingsError
from gateway.shell.token import load_or_create_key
from gateway_harness import ORDER_CRM, POLICIES, gateway_running, session, write_config

PASSPHRASE = b"correct horse battery staple"


def encrypt(key_pem: Path, out: Path, passphrase: bytes = PASSPHRASE) -> Path:
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    out.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(passphrase)))
    return out


def secret(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    path.chmod(0o600)
    return path


def on_a_terminal(*args: str, cwd: Path, timeout_s: float = 30.0) -> tuple[int, str]:
    """Run `gateway ARGS` with a terminal as its stdin, stdout and stderr, as a person at a shell does:
    a prompt there would wait for an answer, and the run would end only at the timeout."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.chdir(cwd)
        argv = gateway_command(*args)
        os.execvp(argv[0], argv)
    out, deadline = b"", time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"still running after {timeout_s}s (waiting at a prompt?): {out!r}")
        if not done:
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.fixture
def encrypted_server_key(tmp_path, test_pki) -> Path:
    return encrypt(test_pki.dir / "server.key", tmp_path / "server-encrypted.key")


def tls(test_pki, key: Path, password_file: Path | None = None) -> dict:
    section = {"cert": str(test_pki.dir / "server.crt"), "key": str(key), "client_ca": str(test_pki.ca),
               "crl": str(test_pki.dir / "crl.pem")}
    if password_file is not None:
        section["key_password_file"] = str(password_file)
    return section


def test_check_says_an_encrypted_key_needs_its_passphrase_file_in_one_line_without_a_prompt(
        tmp_path, test_pki, encrypted_server_key):
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9", tls=tls(test_pki, encrypted_server_key))
    code, out = on_a_terminal("check", "-c", str(config), cwd=tmp_path)
    assert code == 1 and "pass phrase" not in out.lower(), out
    (line,) = [line for line in out.splitlines() if "tls.key" in line]
    assert "is encrypted" in line and "tls.key_password_file" in line


def test_serve_says_so_too_without_a_prompt(tmp_path, test_pki, encrypted_server_key):
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9", tls=tls(test_pki, encrypted_server_key))
    code, out = on_a_terminal("serve", "-c", str(config), cwd=tmp_path)
    assert code == 1 and "pass phrase" not in out.lower(), out
    assert len(out.strip().splitlines()) == 1 and "tls.key_password_file" in out, out


@pytest.mark.parametrize("passphrase, message", [
    (PASSPHRASE + b"\n", None),                         # a trailing line break is not part of it
    (b"wrong\n", "cannot be decrypted"),
    (b"\n", "is empty"),
])
def test_check_with_a_passphrase_file(tmp_path, test_pki, encrypted_server_key, passphrase, message):
    password_file = secret(tmp_path / "server.pass", passphrase)
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9",
                          tls=tls(test_pki, encrypted_server_key, password_file))
    code, out = on_a_terminal("check", "-c", str(config), cwd=tmp_path)
    if message is None:
        assert code == 0 and out.strip().endswith("OK"), out
    else:
        assert code == 1 and message in out and "tls.key" in out, out


def test_check_warns_about_a_passphrase_file_others_can_read(tmp_path, test_pki, encrypted_server_key):
    password_file = secret(tmp_path / "server.pass", PASSPHRASE)
    password_file.chmod(0o644)
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9",
                          tls=tls(test_pki, encrypted_server_key, password_file))
    code, out = on_a_terminal("check", "-c", str(config), cwd=tmp_path)
    assert code == 0 and "warning:" in out and "tls.key_password_file" in out and "chmod 600" in out, out


async def test_the_gateway_serves_with_an_encrypted_key(tmp_path, test_pki, recorder_url, encrypted_server_key):
    password_file = secret(tmp_path / "server.pass", PASSPHRASE + b"\n")
    config = write_config(tmp_path, test_pki, recorder_url, policies={"crm": POLICIES["crm"]},
                          tls=tls(test_pki, encrypted_server_key, password_file),
                          identity_token={"key": "data/token.key", "key_password_file": str(password_file)})
    async with gateway_running(config) as (url, _):
        async with session(test_pki, test_pki.client("crm")) as s:
            async with s.get(f"{url}/orders/{ORDER_CRM}/state") as resp:
                assert resp.status == 200
    token_key = tmp_path / "data" / "token.key"   # created on first start, encrypted with the same passphrase
    assert b"ENCRYPTED" in token_key.read_bytes() and stat.S_IMODE(token_key.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(token_key.read_bytes(), password=None)


def test_an_encrypted_identity_token_key(tmp_path):
    key = tmp_path / "token.key"
    created = load_or_create_key(key, PASSPHRASE, "config.yaml")
    again = load_or_create_key(key, PASSPHRASE, "config.yaml")
    assert created.private_numbers() == again.private_numbers()
    with pytest.raises(SettingsError, match="identity_token.key: .* is encrypted: set identity_token.key_password_file"):
        load_or_create_key(key, None, "config.yaml")
    with pytest.raises(SettingsError, match="cannot be decrypted"):
        load_or_create_key(key, b"wrong", "config.yaml")


def test_check_names_an_encrypted_identity_token_key_without_its_passphrase(tmp_path, test_pki):
    load_or_create_key(tmp_path / "token.key", PASSPHRASE)
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9", identity_token={"key": "token.key"})
    code, out = on_a_terminal("check", "-c", str(config), cwd=tmp_path)
    assert code == 1 and "identity_token.key" in out and "identity_token.key_password_file" in out, out
    assert json.loads(config.read_text())["identity_token"] == {"key": "token.key"}


def test_a_key_of_a_kind_the_gateway_cannot_use_is_one_line(tmp_path, test_pki):
    need_programs("openssl")
    key = tmp_path / "sm2.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "SM2", "-out", str(key)], check=True, capture_output=True)
    config = write_config(tmp_path, test_pki, "http://127.0.0.1:9", tls=tls(test_pki, key))
    code, out = on_a_terminal("check", "-c", str(config), cwd=tmp_path)
    assert code == 1 and "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if "tls.key" in line]
    assert "cannot use" in line
