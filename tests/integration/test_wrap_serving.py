"""Models of every kind, trained here on the Adult sample, wrapped and served together.

One server on 127.0.0.1 serves the four wrapped models beside the credit-risk model
and routes by name; each answers with attributions that add up to its output within
the tolerance its explainer states.
"""

from __future__ import annotations

import math

import bentoml
import httpx
import pytest

from guarded_serving.local_server import LocalServer
from guarded_serving.registry import open_model
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.wrap import wrap_file
from tests import adult_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPECTED_METHOD = {
    "xgboost": "tree_shap",
    "sklearn": "tree_shap",
    "onnx": "kernel_shap",
    "torchscript": "integrated_gradients",
}


@pytest.fixture(scope="module")
def adult():
    return adult_models.load()


@pytest.fixture(scope="module")
def wrapped(adult, master_key, tmp_path_factory):
    """kind -> registered tag, one wrapped model per kind."""
    policy, train, _ = adult
    folder = tmp_path_factory.mktemp("adult-models")
    data = folder / "train.csv"
    train[policy.feature_names + ["income"]].to_csv(data, index=False)
    tags = {}
    for kind, trainer in adult_models.TRAINERS.items():
        model_file = trainer(policy, train, folder)
        result = wrap_file(
            model_file,
            adult_models.POLICY_FILE,
            data,
            master_key,
            trust=True,
            name=f"adult_{kind}",
            labels={"suite": "wrap-kinds"},
        )
        assert result.manifest["explainer"]["method"] == EXPECTED_METHOD[kind]
        tags[kind] = result.tag
    yield tags
    for tag in tags.values():
        bentoml.models.delete(tag)


@pytest.fixture(scope="module")
def multi_server(wrapped, credit_model, server_env, tmp_path_factory):
    state = tmp_path_factory.mktemp("multi")
    tags = [credit_model, *wrapped.values()]
    env = server_env(state, GUARDED_SERVING_MODELS="[" + ",".join(f'"{t}"' for t in tags) + "]")
    with LocalServer(env=env, cwd=state) as server:
        yield server


@pytest.mark.parametrize("kind", list(EXPECTED_METHOD))
def test_each_kind_answers_with_attributions_that_add_up(
    kind, wrapped, multi_server, adult, api_keys, master_key
):
    policy, _, test = adult
    rows = adult_models.records(test.head(12), policy)
    context = test.head(12)[["sex", "race"]].to_dict("records")
    reply = httpx.post(
        multi_server.url + "/predict",
        json={"model": f"adult_{kind}", "records": rows, "context": context},
        headers={"Authorization": f"Bearer {api_keys['alice']}"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == f"adult_{kind}"
    assert body["version"] == wrapped[kind].split(":")[1]

    local = open_model(wrapped[kind], master_key)
    scores = local.runtime.predict_score(ModelInput(rows, local.encoder))
    for prediction, score in zip(body["predictions"], scores, strict=True):
        expected = score if local.runtime.output_space == "probability" else _sigmoid(score)
        assert prediction["probability"] == pytest.approx(expected, abs=1e-6)
        explanation = prediction["explanation"]
        assert explanation["method"] == EXPECTED_METHOD[kind]
        assert explanation["status"] == "ok"
        assert list(explanation["attributions"]) == policy.feature_names
        total = explanation["base_value"] + sum(explanation["attributions"].values())
        assert abs(total - explanation["output"]) <= explanation["tolerance"]
        p = prediction["probability"]
        in_space = p if explanation["output_space"] == "probability" else math.log(p / (1 - p))
        assert explanation["output"] == pytest.approx(in_space, abs=1e-5)
    if kind == "onnx":
        assert (
            body["predictions"][0]["explanation"]["samples"] == policy.explanation.kernel.samples
        )
    if kind == "torchscript":
        assert body["predictions"][0]["explanation"]["steps"] >= policy.explanation.gradient.steps


def test_the_server_reports_every_model_ready(multi_server, wrapped, api_keys):
    headers = {"Authorization": f"Bearer {api_keys['alice']}"}
    status = httpx.get(multi_server.url + "/models", headers=headers).json()
    assert status["ready"] is True
    assert {m["model"] for m in status["models"]} == {"credit_risk"} | {
        f"adult_{kind}" for kind in wrapped
    }


def test_requests_route_by_name_and_version(multi_server, wrapped, adult, api_keys):
    policy, _, test = adult
    rows = adult_models.records(test.head(1), policy)
    headers = {"Authorization": f"Bearer {api_keys['bob']}"}
    version = wrapped["xgboost"].split(":")[1]
    pinned = httpx.post(
        multi_server.url + "/predict",
        headers=headers,
        json={"model": "adult_xgboost", "version": version, "records": rows},
    )
    assert pinned.status_code == 200
    wrong = httpx.post(
        multi_server.url + "/predict",
        headers=headers,
        json={"model": "adult_xgboost", "version": "nope", "records": rows},
    )
    assert (wrong.status_code, wrong.json()["code"]) == (404, "unknown_model")
    # With several models served, the name is required.
    unnamed = httpx.post(multi_server.url + "/predict", headers=headers, json={"records": rows})
    assert (unnamed.status_code, unnamed.json()["field"]) == (422, "model")
    assert unnamed.json()["code"] == "missing_field"


def test_fairness_is_kept_per_model(multi_server, adult, api_keys):
    policy, _, test = adult
    headers = {"Authorization": f"Bearer {api_keys['bob']}"}
    rows = adult_models.records(test.tail(5), policy)
    context = test.tail(5)[["sex", "race"]].to_dict("records")
    before = httpx.get(multi_server.url + "/fairness", headers=headers).json()
    reply = httpx.post(
        multi_server.url + "/predict",
        headers=headers,
        json={"model": "adult_xgboost", "records": rows, "context": context},
    )
    assert reply.status_code == 200
    after = httpx.get(multi_server.url + "/fairness", headers=headers).json()

    def total(report: dict, model: str) -> int:
        groups = report["models"][model]["attributes"]["sex"]["groups"]
        return sum(g["n"] for g in groups.values())

    assert total(after, "adult_xgboost") == total(before, "adult_xgboost") + 5
    for kind in ("sklearn", "onnx", "torchscript"):
        assert total(after, f"adult_{kind}") == total(before, f"adult_{kind}")


def test_a_label_counts_only_for_the_model_that_made_the_prediction(multi_server, adult, api_keys):
    policy, _, test = adult
    headers = {"Authorization": f"Bearer {api_keys['bob']}"}
    rows = adult_models.records(test.head(1), policy)
    context = test.head(1)[["sex", "race"]].to_dict("records")
    reply = httpx.post(
        multi_server.url + "/predict",
        headers=headers,
        json={"model": "adult_xgboost", "records": rows, "context": context},
    )
    [record_id] = [p["id"] for p in reply.json()["predictions"]]
    label = {"labels": [{"id": record_id, "label": "over_50k"}]}

    elsewhere = httpx.post(
        multi_server.url + "/feedback", headers=headers, json={"model": "adult_sklearn", **label}
    )
    assert elsewhere.status_code == 200
    assert (elsewhere.json()["accepted"], elsewhere.json()["unknown_ids"]) == (0, [record_id])
    own = httpx.post(
        multi_server.url + "/feedback", headers=headers, json={"model": "adult_xgboost", **label}
    )
    assert (own.json()["accepted"], own.json()["unknown_ids"]) == (1, [])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
