"""The dependency bounds, the lock file and the oldest set agree with pyproject.toml.

pyproject.toml bounds every dependency above; requirements.lock records one tested set (hash-pinned,
what the Dockerfile installs); constraints/oldest.txt pins each dependency at its lower bound, the
other set CI runs the suite on. A bound changed in one place and not the others fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from test_deploy import dockerfile_instructions

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
TEST = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


BUILD = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]


def lock(name: str = "requirements.lock") -> dict[str, tuple[Version, list[str]]]:
    """A lock file: name -> (version, its sha256 hashes)."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in (ROOT / name).read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            pins[current] = (Version(match.group(2)), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            pins[current][1].append(digest)
    return pins


def oldest() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints" / "oldest.txt").read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def lower_bound(req: Requirement) -> Version:
    (low,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return low


@pytest.mark.parametrize("req", RUNTIME + TEST, ids=lambda r: r.name)
def test_every_dependency_has_an_upper_and_a_lower_bound(req):
    operators = {s.operator for s in req.specifier}
    assert "<" in operators and ">=" in operators, f"{req}: bound it below (tested) and above (next major)"


@pytest.mark.parametrize("req", RUNTIME, ids=lambda r: r.name)
def test_the_lock_pins_every_runtime_dependency_within_its_bounds_with_hashes(req):
    pins = lock()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is not in requirements.lock: regenerate it (README)"
    version, hashes = pins[name]
    assert req.specifier.contains(version, prereleases=True), f"the lock's {name}=={version} is outside {req}"
    assert hashes, f"{name} has no hash in requirements.lock"


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-build.lock"])
def test_every_pin_of_the_locks_carries_hashes(name):
    unhashed = [pin for pin, (_, hashes) in lock(name).items() if not hashes]
    assert lock(name) and not unhashed, unhashed


@pytest.mark.parametrize("req", BUILD, ids=lambda r: r.name)
def test_the_build_lock_pins_the_build_backend_within_its_bounds(req):
    version, _ = lock("requirements-build.lock")[canonicalize_name(req.name)]
    assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req}"


@pytest.mark.parametrize("req", RUNTIME + TEST, ids=lambda r: r.name)
def test_the_oldest_set_pins_each_dependency_at_its_lower_bound(req):
    pins = oldest()
    name = canonicalize_name(req.name)
    assert pins.get(name) == lower_bound(req), f"constraints/oldest.txt: {name} should be =={lower_bound(req)}"


def test_the_oldest_set_pins_nothing_else():
    names = {canonicalize_name(r.name) for r in RUNTIME + TEST}
    assert set(oldest()) == names


def test_the_image_installs_the_locks_with_hashes_and_nothing_unlocked():
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "pip install" in args]
    installs = [cmd.strip() for args in runs for cmd in args.split("&&") if "pip install" in cmd]
    assert any("--require-hashes" in cmd and "-r requirements.lock" in cmd and "-r requirements-build.lock" in cmd
               for cmd in installs), installs
    for cmd in installs:
        locked = "--require-hashes" in cmd
        own = "--no-deps" in cmd and "--no-build-isolation" in cmd   # the gateway, with the locked backend
        assert locked or own, f"installs unlocked versions: {cmd}"
