"""The Python packages are locked: the venv holds exactly what constraints.txt names, at
those versions, and `make setup` installs through the lock (run `make lock` to move it)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib

from packaging.requirements import Requirement

from tests.conftest import REPO

# Not resolved from pyproject.toml: pip is pinned in the Makefile; `python -m venv` puts
# its own setuptools in a 3.11 venv (none from 3.12 on), and nothing imports it.
BOOTSTRAP = {"pip", "setuptools"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (REPO / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path}: {line!r} is not NAME==VERSION"
            assert canonical(name) not in out, f"{path}: {name} pinned twice"
            out[canonical(name)] = version
    return out


def makefile_pip() -> str:
    found = re.search(r"^PIP_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert found, "the Makefile pins no pip version"
    return found.group(1)


def test_venv_matches_the_lock() -> None:
    locked = pins("constraints.txt")
    installed = {canonical(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions()}
    installed.pop("zerostack", None)
    assert installed.get("pip") == makefile_pip(), f"pip {installed.get('pip')} in {sys.prefix}"
    ours = {k: v for k, v in installed.items() if k not in BOOTSTRAP}
    drift = {k: (v, locked.get(k)) for k, v in ours.items() if locked.get(k) != v}
    assert not drift, f"installed (version, locked version) differ: {drift}; run `make clean setup`"
    stale = sorted(set(locked) - set(ours))
    assert not stale, f"constraints.txt pins packages nothing installs: {stale}; run `make lock`"


def test_the_lock_covers_every_declared_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    locked = pins("constraints.txt")
    declared = [*project["project"]["dependencies"],
                *project["project"]["optional-dependencies"]["dev"]]
    for text in declared:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate():
            assert canonical(req.name) in locked, f"{req.name} is not in constraints.txt"
            assert locked[canonical(req.name)] in req.specifier, (req, locked[canonical(req.name)])
    build = pins("build-constraints.txt")
    for text in project["build-system"]["requires"]:
        req = Requirement(text)
        assert build.get(canonical(req.name)) in req.specifier, (req, build.get(req.name))
    # The package and the tools that build it agree on the one version of mypy.
    assert build["mypy"] == locked["mypy"]


def test_make_setup_installs_through_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*\bconstraints\.txt\b.*\bbuild-constraints\.txt\b",
                     makefile, re.M), "the install does not depend on the lock files"
    installs = [line.strip() for line in makefile.splitlines() if "pip install" in line]
    assert installs == [
        "$(BIN)/pip install -q pip==$(PIP_VERSION)",
        "$(BIN)/pip install -q -c constraints.txt --build-constraint build-constraints.txt "
        "-e '.[dev]'",
    ]
    assert re.search(r"^lock:\n\tPY=\$\(PY\) bash scripts/update-lock$", makefile, re.M)
