"""A rekeyed model serves only with its new key; a KMS-sealed model serves through the KMS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest

from guarded_serving import kms, vault
from guarded_serving.local_server import LocalServer
from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk
from guarded_serving.rekey import RekeyOutcome, rekey_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    policy = Policy.from_file(credit_risk.POLICY_FILE)
    _, _, test = credit_risk.split(credit_risk.load_german_credit(), policy)
    return test.features.to_dict("records")[:5]


@pytest.fixture(scope="module")
def rekeyed(
    master_key: vault.FileKeyProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, vault.FileKeyProvider]]:
    """A model wrapped with the session's key, then moved to a new key file."""
    new = vault.generate_key_file(tmp_path_factory.mktemp("rekey") / "new.key")
    tag = credit_risk.run(master_key, echo=lambda *_: None)
    try:
        [result] = rekey_store(master_key, new, [tag])
        assert result.outcome is RekeyOutcome.REKEYED
        yield tag, new
    finally:
        # Leave 'credit_risk:latest' pointing at a model sealed with the session's key.
        bentoml.models.delete(tag)


def _auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def _predict(server: LocalServer, api_key: str, rows: list[dict]) -> httpx.Response:
    return httpx.post(
        server.url + "/predict", json={"records": rows}, headers=_auth(api_key), timeout=30
    )


def _models(server: LocalServer, api_key: str) -> list[dict]:
    return httpx.get(server.url + "/models", headers=_auth(api_key), timeout=30).json()["models"]


def test_the_old_key_no_longer_opens_a_rekeyed_model(
    rekeyed, server_env, api_keys, master_key, rows, tmp_path: Path
) -> None:
    tag, new = rekeyed
    env = server_env(tmp_path, GUARDED_SERVING_MODELS=f'["{tag}"]')

    with LocalServer(env=env, cwd=tmp_path, require_ready=False) as server:
        assert httpx.get(server.url + "/readyz").status_code == 503
        [status] = _models(server, api_keys["alice"])
        reply = _predict(server, api_keys["alice"], rows)
        log = server.log()

    assert status["ready"] is False
    assert f"sealed with master key {new.key_id}" in status["reason"]
    assert master_key.key_id in status["reason"]
    assert reply.status_code == 503
    assert reply.json()["code"] == "model_unavailable"
    for secret in (master_key.path.read_text().strip(), new.path.read_text().strip()):
        assert secret not in log


def test_the_new_key_serves_a_rekeyed_model(
    rekeyed, server_env, api_keys, rows, tmp_path: Path
) -> None:
    tag, new = rekeyed
    env = server_env(
        tmp_path,
        GUARDED_SERVING_MODELS=f'["{tag}"]',
        GUARDED_SERVING_MASTER_KEY_FILE=str(new.path),
    )

    with LocalServer(env=env, cwd=tmp_path) as server:
        reply = _predict(server, api_keys["alice"], rows)

    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert f"{body['model']}:{body['version']}" == tag
    assert len(body["predictions"]) == len(rows)


def test_a_model_sealed_through_a_kms_serves_with_the_kms_uri(
    server_env, api_keys, rows, tmp_path: Path
) -> None:
    with kms.KmsStandIn() as stand_in:
        stand_in.create_key("credit")
        with kms.HttpKmsKeyProvider(stand_in.url, "credit") as provider:
            tag = credit_risk.run(provider, echo=lambda *_: None)
        try:
            env = server_env(
                tmp_path,
                GUARDED_SERVING_MODELS=f'["{tag}"]',
                GUARDED_SERVING_MASTER_KEY_URI=stand_in.key_uri("credit"),
            )
            with LocalServer(env=env, cwd=tmp_path) as server:
                [status] = _models(server, api_keys["alice"])
                reply = _predict(server, api_keys["alice"], rows)
        finally:
            bentoml.models.delete(tag)

    assert status["ready"] is True
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["predictions"]) == len(rows)
