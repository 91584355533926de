"""The dependency floors exclude releases with known advisories, and the constraints file that
``make setup`` installs from pins exactly what the tests run with."""

from __future__ import annotations

import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

# (package, the last release an advisory affects): h11's request smuggling (< 0.16),
# starlette's multipart DoS (< 0.47.2), urllib3's redirect handling (< 2.5).
ADVISORIES = [("h11", "0.15.0"), ("starlette", "0.47.1"), ("urllib3", "2.4.0")]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = [project["dependencies"], *project["optional-dependencies"].values()]
    return [Requirement(line) for reqs in lists for line in reqs]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize(("name", "vulnerable"), ADVISORIES)
def test_floors_refuse_versions_with_advisories(name: str, vulnerable: str) -> None:
    reqs = [r for r in _requirements() if canonicalize_name(r.name) == name]
    assert reqs, f"{name} is not named in pyproject.toml, so nothing keeps its floor"
    for req in reqs:
        assert not req.specifier.contains(vulnerable, prereleases=True), str(req)


def test_setup_installs_from_the_constraints() -> None:
    assert "-c constraints.txt -e '.[dev]'" in (ROOT / "Makefile").read_text()
    pins = _constraints()
    for name, vulnerable in ADVISORIES:
        assert Requirement(f"{name}>{vulnerable}").specifier.contains(pins[name]), (name, pins[name])


def test_constraints_pin_what_the_tests_run_with() -> None:
    """Every distribution in this environment is the one constraints.txt pins (run `make lock`
    after changing a dependency)."""
    pins = _constraints()
    drift = {}
    # The environment's own site-packages only: once something imports setuptools, its vendored
    # copies (setuptools/_vendor: jaraco, zipp, packaging...) are on sys.path too.
    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for dist in metadata.distributions(path=sorted(installed)):
        name = canonicalize_name(dist.metadata["Name"])
        if name in {"weightship", "pip", "setuptools", "wheel"}:  # the installer's own
            continue
        if pins.get(name) != dist.version.split("+", 1)[0]:
            drift[name] = (pins.get(name), dist.version)
    assert not drift, f"constraints.txt is out of step (pinned, installed): {drift}"
