"""Shared fixtures: an isolated BentoML store, a master key, the trained reference
models, API keys, and a real server on 127.0.0.1."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# BentoML reads its home when first imported: isolate the store before anything does.
_BENTOML_HOME = tempfile.mkdtemp(prefix="gs-test-bentoml-")
os.environ["BENTOML_HOME"] = _BENTOML_HOME
atexit.register(shutil.rmtree, _BENTOML_HOME, ignore_errors=True)
# Tests set every setting they rely on; none may leak in from the developer's shell.
for _name in [n for n in os.environ if n.startswith(("GUARDED_SERVING_", "OTEL_"))]:
    del os.environ[_name]

from pathlib import Path

import pytest

from guarded_serving import vault
from guarded_serving.guards.identify import add_client
from guarded_serving.local_server import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return Path(_BENTOML_HOME)


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def master_key(key_dir: Path) -> vault.FileKeyProvider:
    return vault.generate_key_file(key_dir / "master.key")


@pytest.fixture(scope="session")
def credit_model(master_key: vault.FileKeyProvider) -> str:
    """The credit-risk reference model, trained and wrapped once per test session."""
    from guarded_serving.recipes import credit_risk

    return credit_risk.run(master_key, echo=lambda *_: None)


@pytest.fixture(scope="session")
def networks(master_key: vault.FileKeyProvider) -> dict[str, list[str]]:
    """The reference networks, trained fast and wrapped once for the whole test run:
    name -> [standard tag, hardened tag]."""
    from guarded_serving.recipes import engine_failure, pneumonia

    return {
        "pneumonia": pneumonia.run(master_key, echo=lambda *_: None, fast=True),
        "engine_failure": engine_failure.run(master_key, echo=lambda *_: None, fast=True),
    }


@pytest.fixture(scope="session")
def api_keys(key_dir: Path) -> dict[str, str]:
    path = key_dir / "api-keys.yaml"
    return {
        "alice": add_client(path, "alice"),
        "bob": add_client(path, "bob"),
        "tiny": add_client(path, "tiny", rows_per_window=3),
        "_file": str(path),
    }


@pytest.fixture(scope="session")
def server_env(credit_model: str, master_key: vault.FileKeyProvider, api_keys: dict[str, str]):
    """Environment for a server on the reference model; each call gets a fresh DB."""

    def make(state_dir: Path, **extra: str) -> dict[str, str]:
        env = {
            "BENTOML_HOME": _BENTOML_HOME,
            "GUARDED_SERVING_MODELS": f'["{credit_model}"]',
            "GUARDED_SERVING_MASTER_KEY_FILE": str(master_key.path),
            "GUARDED_SERVING_API_KEYS_FILE": api_keys["_file"],
            "GUARDED_SERVING_FAIRNESS__DB_PATH": str(state_dir / "fairness.sqlite3"),
        }
        env.update(extra)
        return env

    return make


@pytest.fixture(scope="session")
def server(server_env, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("server")
    with LocalServer(env=server_env(state), cwd=state) as running:
        yield running
