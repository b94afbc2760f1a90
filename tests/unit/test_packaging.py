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
