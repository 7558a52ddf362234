"""The documentation stands on its own: every link resolves inside the repository, nothing points
outside it, and the reference pages name every key, metric and command the code has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gateway.core.policy import MATCH_KEYS, POLICY_KEYS
from gateway.core.policy_schema import policy_schema
from gateway.shell.metrics import Metrics
from gateway.shell.settings import config_schema
from gateway.tools.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "deploy" / "README.md",
                ROOT / "deploy" / "kubernetes" / "README.md",
                ROOT / "policies" / "README.md", ROOT / "certs.example" / "README.md"])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
SKIP_DIRS = {".git", ".venv", "data", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis", "build"}
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".lock", ".js", ".cfg", ""}


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def repository_files():
    for path in ROOT.rglob("*"):
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.name != "test_docs.py":
            yield path


def test_nothing_points_outside_the_repository():
    outside = [str(p.relative_to(ROOT)) for p in repository_files()
               if re.search(r"\.\./shared|CONTRACT\.md|CONTRACT section", p.read_text(errors="replace"))]
    assert not outside, outside


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    for target in LINK.findall(page.read_text()):
        assert not re.match(r"[a-z]+:", target), f"{page.name} links outside the repository: {target}"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md" and anchor in anchors(resolved), f"{page.name}: no #{anchor} in {path}"


def test_the_readme_links_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name}" in readme, page.name


def _keys(schema: dict, where: str = ""):
    for name, sub in schema.get("properties", {}).items():
        inner = next((b for b in sub.get("anyOf", [sub]) if "properties" in b), None)
        if inner is not None and name != "rate_limit":
            yield from _keys(inner, f"{where}{name}.")
        else:
            yield f"{where}{name}"


def test_the_configuration_page_names_every_key():
    page = doc("configuration.md")
    missing = [key for key in _keys(config_schema()) if f"`{key}`" not in page]
    assert not missing, missing


def test_the_policies_page_names_every_key():
    page = doc("policies.md")
    missing = [key for key in [*POLICY_KEYS, *MATCH_KEYS] if f"`{key}`" not in page and f"{key}:" not in page]
    assert not missing, missing
    assert {key.split(".")[0] for key in _keys(policy_schema())} == set(POLICY_KEYS)


def test_the_metrics_page_names_every_metric():
    page = doc("metrics.md")
    names = {family.name + ("_total" if family.type == "counter" else "")
             for family in Metrics().registry.collect()}
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert not missing, missing


def test_the_operating_page_names_every_command():
    page = doc("operating.md")
    commands = []
    for action in _parser()._subparsers._group_actions:
        for name, sub in action.choices.items():
            inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            commands += [f"gateway {name} {s}" for a in inner for s in a.choices] or [f"gateway {name}"]
    missing = [c for c in commands if f"`{c}" not in page]
    assert not missing, missing
