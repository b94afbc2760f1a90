"""A wrong master key or a changed artifact byte: the model refuses to load, clearly."""

from __future__ import annotations

from pathlib import Path

import bentoml
import httpx
import pytest

from guarded_serving import vault
from guarded_serving.local_server import LocalServer
from guarded_serving.recipes import credit_risk
from guarded_serving.wrap import ARTIFACT_FILE

pytestmark = pytest.mark.integration


def _refused(server: LocalServer, api_key: str) -> tuple[dict, dict]:
    assert httpx.get(server.url + "/readyz").status_code == 503
    models = httpx.get(server.url + "/models")
    assert models.status_code == 503
    reply = httpx.post(
        server.url + "/predict",
        json={"records": [{}]},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert reply.status_code == 503
    assert reply.json()["code"] == "model_unavailable"
    return models.json()["models"][0], reply.json()


def test_wrong_master_key_refuses_to_load(server_env, api_keys, tmp_path, master_key):
    other = vault.generate_key_file(tmp_path / "other.key")
    env = server_env(tmp_path, GUARDED_SERVING_MASTER_KEY_FILE=str(other.path))
    with LocalServer(env=env, cwd=tmp_path, require_ready=False) as server:
        status, _ = _refused(server, api_keys["alice"])
        log = server.log()
    assert status["ready"] is False
    assert f"sealed with master key {master_key.key_id}" in status["reason"]
    assert other.key_id in status["reason"]
    assert status["reason"] in log
    for secret in (master_key.path.read_text().strip(), other.path.read_text().strip()):
        assert secret not in log


def test_changed_artifact_byte_refuses_to_load(server_env, api_keys, tmp_path, master_key):
    tag = credit_risk.run(master_key, echo=lambda *_: None)
    artifact = Path(bentoml.models.get(tag).path_of(ARTIFACT_FILE))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))

    env = server_env(tmp_path, GUARDED_SERVING_MODELS=f'["{tag}"]')
    try:
        with LocalServer(env=env, cwd=tmp_path, require_ready=False) as server:
            status, _ = _refused(server, api_keys["alice"])
            log = server.log()
    finally:
        # Leave 'credit_risk:latest' pointing at an intact model for other tests.
        bentoml.models.delete(tag)
    assert "integrity check failed" in status["reason"]
    assert status["reason"] in log
