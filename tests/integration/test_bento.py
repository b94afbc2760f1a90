"""``bentoml build`` from the repository; neither the bento nor any file here holds the
model's plaintext bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import bentoml
import pytest

from guarded_serving import vault
from guarded_serving.wrap import ARTIFACT_FILE
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Big, irrelevant or regenerated trees skipped in the working-tree scan.
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}


def _needles(plaintext_model: bytes) -> list[bytes]:
    """32-byte slices every 1/32 of the model: any copy of a sixteenth of it has one."""
    step = max(len(plaintext_model) // 32, 1)
    return [plaintext_model[o : o + 32] for o in range(0, len(plaintext_model) - 32, step)]


def _files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _holders(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in _files(root) if any(n in p.read_bytes() for n in needles)]


@pytest.fixture(scope="module")
def bento_model(master_key: vault.FileKeyProvider) -> str:
    """A model registered just now, so it is the 'credit_risk:latest' that the build takes."""
    from guarded_serving.recipes import credit_risk

    return credit_risk.run(master_key, echo=lambda *_: None)


@pytest.fixture(scope="module")
def plaintext_model(bento_model: str, master_key: vault.FileKeyProvider) -> bytes:
    stored = bentoml.models.get(bento_model)
    sealed = Path(stored.path_of(ARTIFACT_FILE)).read_bytes()
    files = vault.unpack(
        vault.open_sealed(
            sealed, name="credit_risk", version=stored.tag.version, provider=master_key
        )
    )
    return files["model.bin"]


def test_built_and_exported_bento_holds_no_plaintext_weights(
    bento_model, plaintext_model, bentoml_home, tmp_path
):
    assert str(bentoml.models.get("credit_risk:latest").tag) == bento_model
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(REPO_ROOT), "--output", "tag"],
        cwd=REPO_ROOT,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.get(tag)
    assert [str(m.tag) for m in bento.info.all_models] == [bento_model]

    exported = Path(bentoml.export_bento(tag, str(tmp_path / "guarded_serving.bento")))
    unpacked = tmp_path / "unpacked"
    with tarfile.open(exported) as archive:
        archive.extractall(unpacked, filter="data")
    sealed_copies = list(unpacked.rglob(ARTIFACT_FILE))
    assert len(sealed_copies) == 1, "the exported bento must carry the sealed model"

    needles = _needles(plaintext_model)
    assert not any(n in exported.read_bytes() for n in needles)
    assert _holders(unpacked, needles) == []
    assert _holders(Path(bento.path), needles) == []
    assert _holders(bentoml_home / "models", needles) == []


def test_working_tree_holds_no_plaintext_weights(plaintext_model, tmp_path):
    # The scan itself must find a plaintext copy where there is one.
    sixteenth = plaintext_model[len(plaintext_model) // 3 :][: len(plaintext_model) // 16]
    (tmp_path / "leak.bin").write_bytes(b"prefix" + sixteenth + b"suffix")
    assert _holders(tmp_path, _needles(plaintext_model)) == [str(tmp_path / "leak.bin")]

    assert _holders(REPO_ROOT, _needles(plaintext_model)) == []
