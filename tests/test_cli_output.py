"""What every command prints on stderr: its own warnings and one line a problem, nothing from dependencies.

Run as a new user runs them, in a fresh virtualenv with today's versions, where a dependency's
deprecation warning (pyHanko importing DSA under cryptography 51) would otherwise turn a one-line
error into three.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import gateway_command

ROOT = Path(__file__).resolve().parent.parent
PYTHON_WARNING = re.compile(r"\w+Warning: |^\s+(from|import) ", re.M)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(gateway_command(*args), cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("args, rc", [
    (["check", "-c", str(ROOT / "config.yaml")], 0),
    (["policy", "test", "-c", str(ROOT / "config.yaml")], 0),
    (["policy", "explain", "-c", str(ROOT / "config.yaml"), "--cert", str(ROOT / "certs.example/clients/crm.crt"),
      "--method", "DELETE", "--path", "/orders/22222222-2222-4222-8222-222222222222"], 1),
    (["certs", "init", "pki", "--client", "a"], 0),
    (["schema", "config"], 0),
], ids=["check", "policy-test", "explain", "certs-init", "schema"])
def test_commands_print_no_dependency_warnings(tmp_path, args, rc):
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == rc, proc.stderr
    assert not PYTHON_WARNING.search(proc.stderr), proc.stderr
    assert all(line.startswith("warning: ") for line in proc.stderr.splitlines()), proc.stderr


@pytest.mark.parametrize("args, where", [
    (["check", "-c", "missing.yaml"], "missing.yaml"),
    (["serve", "-c", "missing.yaml"], "missing.yaml"),
    (["reference-api", "-c", "bad.yaml"], "reference_api.timezone"),
    (["audit", "verify", "missing.jsonl"], "missing.jsonl"),
    (["certs", "issue", "nowhere", "x"], "nowhere"),
    (["policy", "test", "-c", "bad.yaml"], "policies"),
], ids=["check", "serve", "reference-api", "audit-verify", "certs-issue", "policy-test"])
def test_errors_are_one_line_naming_what_is_wrong(tmp_path, args, where):
    (tmp_path / "bad.yaml").write_text("reference_api:\n  timezone: Mars/Olympus\n")
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode in (1, 2), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_warnings_of_dependencies_are_quiet_and_the_gateways_own_are_not(monkeypatch):
    import sys
    import warnings

    from gateway.tools.cli import quiet_dependency_warnings

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        for module in ("pyhanko.sign.signers.pdf_cms", "cryptography.utils", "asyncio.events", "gateway.shell.tls",
                       "gateway"):
            warnings.warn_explicit("a warning", UserWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in caught] == ["a warning", "a warning"]   # gateway's two only
