"""The layout says what is pure, and this test keeps it so.

core/ decides and does no I/O: it imports none of aiohttp, asyncio, redis,
prometheus_client, yaml, socket, ssl or the shell/runtime/tools packages. The
gateway (core, shell, runtime) never imports the reference API. Checked on the source (ast), so a
lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
FORBIDDEN_IN_CORE = ("aiohttp", "asyncio", "redis", "prometheus_client", "yaml", "socket", "ssl", "multidict",
                     "gateway.shell", "gateway.runtime", "gateway.tools", "gateway.reference")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("module", sorted(p.name for p in (GATEWAY / "core").glob("*.py")))
def test_the_core_does_no_io(module):
    assert offending(GATEWAY / "core" / module, FORBIDDEN_IN_CORE) == []


def test_the_gateway_never_imports_the_reference_api():
    """It talks to it over HTTP; only the command line starts it (`gateway reference-api`)."""
    for part in ("core", "shell", "runtime"):
        for path in (GATEWAY / part).glob("*.py"):
            assert offending(path, ("gateway.reference",)) == [], path


def test_the_shell_does_not_reach_into_the_runtime_or_the_tools():
    for path in (GATEWAY / "shell").glob("*.py"):
        assert offending(path, ("gateway.runtime", "gateway.tools")) == [], path


def test_the_detector_sees_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import asyncio\n    from gateway.shell.tls import x\n")
    assert offending(bad, FORBIDDEN_IN_CORE) == ["asyncio", "gateway.shell.tls"]
