"""The model registry: opening sealed models, and keeping failures as 'not ready'."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import pytest

from guarded_serving import vault
from guarded_serving.errors import (
    ArtifactTampered,
    ConfigError,
    InvalidInput,
    ModelUnavailable,
    UnknownModel,
    WrongMasterKey,
)
from guarded_serving.explain.base import ExplainStage
from guarded_serving.explain.tree import XGBoostTreeExplainer
from guarded_serving.recipes import credit_risk
from guarded_serving.registry import LoadedModel, ModelRegistry, open_model
from guarded_serving.runtimes.xgboost import XGBoostRuntime
from guarded_serving.types import ScoringRequest
from guarded_serving.wrap import ARTIFACT_FILE, MANIFEST_FILE


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> vault.FileKeyProvider:
    return vault.generate_key_file(tmp_path_factory.mktemp("other-key") / "master.key")


@pytest.fixture(scope="module")
def spare_model(sealing_key: vault.FileKeyProvider) -> str:
    """A second registered version, for tests that change its stored files."""
    return credit_risk.run(sealing_key, echo=lambda _: None)


def _artifact(tag: str) -> Path:
    return Path(bentoml.models.get(tag).path_of(ARTIFACT_FILE))


@pytest.fixture
def tampered_artifact(spare_model: str) -> Iterator[tuple[str, Path, bytes]]:
    """The spare model's artifact path and bytes, restored after the test."""
    path = _artifact(spare_model)
    original = path.read_bytes()
    yield spare_model, path, original
    path.write_bytes(original)


def test_open_model_decrypts_a_working_model(
    credit_run: Any, credit_record: dict[str, Any]
) -> None:
    model = open_model(credit_run.tag, credit_run.provider)

    name, version = credit_run.tag.split(":")
    assert (model.name, model.version) == (name, version)
    assert model.policy.model == "credit_risk"
    stored = bentoml.models.get(credit_run.tag)
    with open(stored.path_of(MANIFEST_FILE), encoding="utf-8") as fh:
        on_disk = json.load(fh)
    assert model.manifest["model_sha256"] == on_disk["model_sha256"]
    assert model.manifest["calibration"] == on_disk["calibration"]

    assert model.manifest["explainer"] == on_disk["explainer"]
    # The runtime and the explainer are rebuilt from what the manifest recorded.
    assert isinstance(model.runtime, XGBoostRuntime)
    assert model.runtime.output_space == model.manifest["output_space"] == "margin"
    assert model.manifest["explainer"]["method"] == "tree_shap"
    assert model.manifest["explainer"]["options"] == {"engine": "xgboost"}
    assert isinstance(model.explainer, XGBoostTreeExplainer)
    assert model.explainer.runtime is model.runtime

    other = credit_record | {"purpose": "A40", "duration_months": 36}
    request = ScoringRequest("req-1", model, None, [credit_record, other])
    model.schema(request)
    model.anomaly(request)
    ExplainStage()(request)
    assert request.inputs is not None
    scores = model.runtime.predict_score(request.inputs)
    margins = model.runtime.predict_margin(request.inputs.matrix)
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
    np.testing.assert_array_equal(scores, margins)
    assert scores[0] != scores[1]
    assert request.explanations is not None and len(request.explanations) == 2
    for explanation, margin in zip(request.explanations, margins, strict=True):
        assert (explanation.method, explanation.output_space) == ("tree_shap", "log_odds")
        assert explanation.status == "ok"
        assert list(explanation.attributions) == model.policy.feature_names
        total = explanation.base_value + sum(explanation.attributions.values())
        assert total == pytest.approx(margin, abs=explanation.tolerance)
        assert explanation.tolerance == pytest.approx(1e-5)


def test_registry_serves_a_good_model(credit_run: Any) -> None:
    registry = ModelRegistry([credit_run.tag], credit_run.provider)

    assert registry.all_ready
    [status] = registry.statuses()
    assert (status.name, status.ready, status.reason) == ("credit_risk", True, None)
    assert status.version == credit_run.tag.split(":")[1]
    assert isinstance(registry.get("credit_risk"), LoadedModel)
    # The only served model is the default, and its own version resolves.
    assert registry.get(None) is registry.get("credit_risk", status.version)
    assert set(registry.loaded()) == {"credit_risk"}


def test_two_versions_of_one_model_are_served_side_by_side(
    credit_run: Any, spare_model: str
) -> None:
    older, newer = credit_run.tag.split(":")[1], spare_model.split(":")[1]

    # Listed newest first: the default is still the one registered last.
    registry = ModelRegistry([spare_model, credit_run.tag], credit_run.provider)

    assert registry.all_ready
    assert [s.version for s in registry.statuses()] == [newer, older]
    assert registry.get("credit_risk").version == newer
    assert registry.get(None).version == newer
    assert registry.get("credit_risk", older).version == older
    assert registry.get("credit_risk", newer) is registry.get("credit_risk")
    assert registry.loaded()["credit_risk"].version == newer
    with pytest.raises(UnknownModel) as caught:
        registry.get("credit_risk", "no-such-version")
    assert caught.value.field == "version"


def test_a_version_listed_twice_is_refused(credit_run: Any) -> None:
    newest = str(bentoml.models.get("credit_risk:latest").tag)

    for tags in ([credit_run.tag, credit_run.tag], [newest, "credit_risk:latest"]):
        with pytest.raises(ConfigError) as caught:
            ModelRegistry(tags, credit_run.provider)
        assert "listed more than once" in caught.value.message


def test_a_broken_newest_version_is_not_replaced_by_an_older_one(
    credit_run: Any, tampered_artifact: tuple[str, Path, bytes]
) -> None:
    tag, path, original = tampered_artifact
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))

    registry = ModelRegistry([credit_run.tag, tag], credit_run.provider)

    ready = {s.version: s.ready for s in registry.statuses()}
    assert ready == {credit_run.tag.split(":")[1]: True, tag.split(":")[1]: False}
    with pytest.raises(ModelUnavailable):
        registry.get("credit_risk")
    assert registry.get("credit_risk", credit_run.tag.split(":")[1]).name == "credit_risk"
    assert registry.loaded() == {}


def test_wrong_master_key_leaves_the_model_not_ready(
    credit_run: Any, other_key: vault.FileKeyProvider
) -> None:
    with pytest.raises(WrongMasterKey):
        open_model(credit_run.tag, other_key)

    registry = ModelRegistry([credit_run.tag], other_key)

    assert not registry.all_ready
    [status] = registry.statuses()
    assert not status.ready and status.model is None
    assert status.reason is not None and "master key" in status.reason
    assert registry.loaded() == {}
    with pytest.raises(ModelUnavailable) as caught:
        registry.get("credit_risk")
    assert (caught.value.code, caught.value.status_code) == ("model_unavailable", 503)
    # The version comes from the store, so an operator sees which one failed.
    assert status.to_dict() == {
        "model": "credit_risk",
        "version": credit_run.tag.split(":")[1],
        "ready": False,
        "reason": status.reason,
    }


def test_no_master_key_leaves_the_model_not_ready(credit_run: Any) -> None:
    registry = ModelRegistry([credit_run.tag], None)

    [status] = registry.statuses()
    assert not status.ready
    assert status.reason is not None and "master key" in status.reason
    with pytest.raises(ModelUnavailable):
        registry.get("credit_risk")


@pytest.mark.parametrize("where", ["payload-start", "payload-middle", "gcm-tag", "wrapped-key"])
def test_a_flipped_byte_leaves_the_model_not_ready(
    tampered_artifact: tuple[str, Path, bytes], sealing_key: vault.FileKeyProvider, where: str
) -> None:
    tag, path, original = tampered_artifact
    header_end = original.index(b"\n", len(vault.MAGIC))
    header = json.loads(original[len(vault.MAGIC) : header_end])
    offset = {
        "payload-start": header_end + 1,
        "payload-middle": (header_end + len(original)) // 2,
        "gcm-tag": len(original) - 1,
    }.get(where)
    changed = bytearray(original)
    if offset is None:
        # A canonical-looking header whose wrapped key decrypts to nothing.
        wrapped = bytearray(base64.b64decode(header["wrapped_key"]))
        wrapped[0] ^= 0x01
        old, new = header["wrapped_key"], base64.b64encode(bytes(wrapped)).decode()
        changed = bytearray(original.replace(old.encode(), new.encode(), 1))
    else:
        changed[offset] ^= 0x01
    path.write_bytes(bytes(changed))

    with pytest.raises(ArtifactTampered):
        open_model(tag, sealing_key)
    registry = ModelRegistry([tag], sealing_key)

    [status] = registry.statuses()
    assert not status.ready
    assert status.reason is not None and "integrity" in status.reason
    with pytest.raises(ModelUnavailable):
        registry.get("credit_risk")


def test_restored_artifact_opens_again(
    tampered_artifact: tuple[str, Path, bytes], sealing_key: vault.FileKeyProvider
) -> None:
    tag, _, _ = tampered_artifact

    assert ModelRegistry([tag], sealing_key).all_ready


def test_unknown_model_and_version(credit_run: Any) -> None:
    registry = ModelRegistry([credit_run.tag], credit_run.provider)

    for name in ("pneumonia", ""):
        with pytest.raises(UnknownModel) as caught:
            registry.get(name)
        assert (caught.value.code, caught.value.field, caught.value.status_code) == (
            "unknown_model",
            "model",
            404,
        )
    for name in (42, ["credit_risk"]):
        with pytest.raises(InvalidInput) as wrong:
            registry.get(name)
        assert (wrong.value.code, wrong.value.field, wrong.value.status_code) == (
            "wrong_type",
            "model",
            422,
        )
    with pytest.raises(UnknownModel) as caught:
        registry.get("credit_risk", "no-such-version")
    assert caught.value.field == "version"


def test_one_missing_tag_does_not_stop_the_good_model(credit_run: Any) -> None:
    registry = ModelRegistry([credit_run.tag, "pneumonia:doesnotexist"], credit_run.provider)

    assert not registry.all_ready
    statuses = {s.name: s for s in registry.statuses()}
    assert statuses["credit_risk"].ready
    assert not statuses["pneumonia"].ready
    assert statuses["pneumonia"].reason == "not found in the model store"
    assert registry.get("credit_risk").name == "credit_risk"
    with pytest.raises(ModelUnavailable):
        registry.get("pneumonia")
    # With two models configured, a request must name one.
    with pytest.raises(InvalidInput) as caught:
        registry.get(None)
    assert (caught.value.code, caught.value.field) == ("missing_field", "model")


def test_a_store_model_without_an_artifact_does_not_stop_the_good_model(
    credit_run: Any,
) -> None:
    # A model of the same store that guarded-serving did not wrap (no artifact.sealed).
    with bentoml.models.create("plain_model") as plain:
        Path(plain.path_of("weights.bin")).write_bytes(b"\x00" * 16)

    registry = ModelRegistry([credit_run.tag, str(plain.tag)], credit_run.provider)

    statuses = {s.name: s for s in registry.statuses()}
    assert statuses["credit_risk"].ready
    assert not statuses["plain_model"].ready
    assert statuses["plain_model"].reason
    with pytest.raises(ModelUnavailable):
        registry.get("plain_model")
