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
    models = httpx.get(server.url + "/models", headers={"Authorization": f"Bearer {api_key}"})
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


def test_a_broken_model_does_not_stop_the_others(
    server_env, api_keys, tmp_path, master_key, credit_model
):
    """One model sealed under another key, one with a changed byte: only they fail."""
    other_key = vault.generate_key_file(tmp_path / "other.key")
    foreign = credit_risk.run(other_key, echo=lambda *_: None, name="credit_foreign")
    tampered = credit_risk.run(master_key, echo=lambda *_: None, name="credit_tampered")
    artifact = Path(bentoml.models.get(tampered).path_of(ARTIFACT_FILE))
    data = bytearray(artifact.read_bytes())
    data[-10] ^= 0x40
    artifact.write_bytes(bytes(data))
    tags = [credit_model, foreign, tampered]
    headers = {"Authorization": f"Bearer {api_keys['alice']}"}
    try:
        env = server_env(
            tmp_path,
            GUARDED_SERVING_MODELS="[" + ",".join(f'"{t}"' for t in tags) + "]",
            GUARDED_SERVING_READY_WHEN="any",
        )
        with LocalServer(env=env, cwd=tmp_path) as server:
            status = httpx.get(server.url + "/models", headers=headers)
            log = server.log()
            row = _rows(1)
            answers = {
                name: httpx.post(
                    server.url + "/predict", headers=headers, json={"model": name, "records": row}
                )
                for name in ("credit_risk", "credit_foreign", "credit_tampered")
            }
    finally:
        bentoml.models.delete(foreign)
        bentoml.models.delete(tampered)

    assert status.status_code == 503
    by_name = {m["model"]: m for m in status.json()["models"]}
    assert by_name["credit_risk"]["ready"] is True
    assert "sealed with master key" in by_name["credit_foreign"]["reason"]
    assert "integrity check failed" in by_name["credit_tampered"]["reason"]
    for name in ("credit_foreign", "credit_tampered"):
        assert by_name[name]["ready"] is False
        assert by_name[name]["reason"] in log
        assert answers[name].status_code == 503
        assert answers[name].json()["code"] == "model_unavailable"
    assert answers["credit_risk"].status_code == 200


def _rows(n: int) -> list[dict]:
    from guarded_serving.policy import Policy

    policy = Policy.from_file(credit_risk.POLICY_FILE)
    _, _, test = credit_risk.split(credit_risk.load_german_credit(), policy)
    return test.features.to_dict("records")[:n]
