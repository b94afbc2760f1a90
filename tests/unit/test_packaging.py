"""Packaging: the bento's requirements match the package's declared dependencies."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def _bento_requirements() -> list[str]:
    lines = (REPO_ROOT / "requirements" / "bento.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_bento_requirements_match_the_project_dependencies() -> None:
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        dependencies = tomllib.load(fh)["project"]["dependencies"]

    requirements = _bento_requirements()

    assert len(requirements) == len(set(requirements))
    assert sorted(requirements) == sorted(dependencies)


def test_bentofile_uses_the_bento_requirements() -> None:
    bentofile = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text(encoding="utf-8"))

    path = REPO_ROOT / bentofile["python"]["requirements_txt"]
    assert path.resolve() == (REPO_ROOT / "requirements" / "bento.txt").resolve()


def _runtime_distributions(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` pull in, transitively, without extras."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in metadata.requires(requirement.name) or [])
        except metadata.PackageNotFoundError:
            continue
    return seen


def test_the_package_and_its_recipes_run_without_the_test_extras(tmp_path: Path) -> None:
    # What `pip install -e .` alone gives must be enough for the demo: block every
    # module that only the test extras bring, then import the whole package and
    # export both reference networks as their recipes do.
    import subprocess
    import sys
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)["project"]
    runtime = _runtime_distributions(project["dependencies"])
    test_only = {
        canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["test"]
    } - runtime
    blocked = sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if {canonicalize_name(d) for d in dists} <= test_only
    )
    assert "pytest" in blocked and "guarded_serving" not in blocked

    script = tmp_path / "runtime_only.py"
    script.write_text(
        f"""
import importlib, importlib.abc, pkgutil, sys
BLOCKED = set({blocked!r})

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (test extra)", name=name)
        return None

sys.meta_path.insert(0, Block())
import guarded_serving
for module in pkgutil.walk_packages(guarded_serving.__path__, "guarded_serving."):
    importlib.import_module(module.name)

import numpy as np
from guarded_serving.recipes import _networks, engine_failure, pneumonia
for shape, module in (
    (pneumonia.IMAGE_SHAPE, pneumonia.build_model()),
    ((engine_failure.WINDOW, len(engine_failure.FEATURES)), engine_failure.build_model()),
):
    _networks.export(module.eval(), shape, np.zeros((2, *shape), dtype=np.float32))
print("ok")
""",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(script)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
