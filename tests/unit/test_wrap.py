"""Wrapping a model: refusals that name the problem, and what a wrapped model carries."""

from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import joblib
import numpy as np
import pandas as pd
import pytest
import skops.io
import torch
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from guarded_serving import vault
from guarded_serving.encoding import TabularEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.policy import Policy
from guarded_serving.registry import open_model, tags_with_label
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.wrap import MANIFEST_FILE, POLICY_FILE, STORE_LABEL, wrap_file, wrap_model
from tests import adult_models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")

SEED = 17


@dataclass(frozen=True)
class Adult:
    """The Adult policy, a small data sample (also as a CSV) and a small xgboost model."""

    policy: Policy
    frame: pd.DataFrame
    data_file: Path
    xgboost_file: Path
    folder: Path


@pytest.fixture(scope="module")
def adult(tmp_path_factory: pytest.TempPathFactory) -> Adult:
    policy, train, _ = adult_models.load()
    folder = tmp_path_factory.mktemp("wrap")
    frame = train.head(300).reset_index(drop=True)
    data_file = folder / "train.csv"
    frame[policy.feature_names + ["income"]].to_csv(data_file, index=False)
    model_file = adult_models.train_xgboost(policy, train.head(400), folder, rounds=10)
    return Adult(policy, frame, data_file, model_file, folder)


@pytest.fixture(scope="module")
def created() -> Iterator[list[str]]:
    """Tags registered by this module's tests, deleted when the module is done."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        try:
            bentoml.models.delete(tag)
        except bentoml.exceptions.NotFound:
            continue


def _named(policy: Policy, name: str, **changes) -> Policy:
    return Policy.model_validate({**policy.model_dump(), "model": name, **changes})


def _wrap(adult: Adult, created: list[str], name: str, **kwargs):
    kwargs.setdefault("policy", _named(adult.policy, name))
    kwargs.setdefault("runtime", "xgboost")
    kwargs.setdefault("model_bytes", adult.xgboost_file.read_bytes())
    kwargs.setdefault("train", adult.frame)
    result = wrap_model(**kwargs)
    created.append(result.tag)
    return result


def _message(caught: pytest.ExceptionInfo[ConfigError]) -> str:
    assert caught.value.code == "config_error"
    return caught.value.message


def _scripted(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


class _Constant(torch.nn.Module):
    """Returns the same value for every row, whatever the input."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.value)


# Refusals: each names what does not fit


def test_data_lacking_a_policy_feature_is_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    lacking = adult.frame.drop(columns=["age", "hours_per_week"])

    with pytest.raises(ConfigError) as caught:
        _wrap(adult, created, "gs_wrap_lacking", train=lacking, provider=master_key)
    message = _message(caught)
    assert "training data" in message
    assert "age" in message and "hours_per_week" in message
    assert "workclass" not in message

    with pytest.raises(ConfigError) as caught:
        _wrap(
            adult,
            created,
            "gs_wrap_lacking",
            calibration=adult.frame.drop(columns=["occupation"]),
            provider=master_key,
        )
    message = _message(caught)
    assert "calibration data" in message and "occupation" in message


def test_rows_breaking_the_policy_are_counted_and_the_first_reported(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    bad = adult.frame.copy()
    bad.loc[[7, 40, 41], "age"] = 150
    bad.loc[90, "workclass"] = "Never-worked"

    with pytest.raises(ConfigError) as caught:
        # With calibration rows given, the training rows keep their order.
        _wrap(
            adult,
            created,
            "gs_wrap_bad_rows",
            train=bad,
            calibration=adult.frame.head(50),
            provider=master_key,
        )
    message = _message(caught)
    assert "training data" in message
    assert f"4 of {len(bad)} rows" in message
    assert "row 7" in message
    assert "age" in message and "out_of_range" in message


def test_a_file_of_unknown_kind_is_refused(
    adult: Adult, master_key: vault.FileKeyProvider
) -> None:
    model_file = adult.folder / "model.h5"
    model_file.write_bytes(b"\x89HDF")

    with pytest.raises(ConfigError) as caught:
        wrap_file(model_file, adult_models.POLICY_FILE, adult.data_file, master_key)
    message = _message(caught)
    assert "model.h5" in message
    # It says which extensions are understood.
    for suffix in (".json", ".onnx", ".skops", ".pt"):
        assert suffix in message


@pytest.fixture(scope="module")
def logistic(adult: Adult) -> Pipeline:
    """A scikit-learn pipeline whose last step is not a tree (KernelSHAP: quick to wrap)."""
    estimator = Pipeline(
        [("negate", FunctionTransformer(operator.neg)),
         ("scale", StandardScaler()),
         ("logit", LogisticRegression(max_iter=500))]
    )  # fmt: skip
    pipeline = adult_models.sklearn_pipeline(adult.policy, estimator)
    return pipeline.fit(adult.frame[adult.policy.feature_names], adult.frame["income"])


def test_a_pickle_is_refused_without_trust_and_wrapped_with_it(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str], logistic: Pipeline
) -> None:
    model_file = adult.folder / "model.joblib"
    joblib.dump(logistic, model_file)

    with pytest.raises(ConfigError) as caught:
        wrap_file(model_file, adult_models.POLICY_FILE, adult.data_file, master_key)
    message = _message(caught)
    assert "model.joblib" in message and "pickle" in message and "trust" in message

    result = wrap_file(
        model_file,
        adult_models.POLICY_FILE,
        adult.data_file,
        master_key,
        trust=True,
        name="gs_wrap_joblib",
    )
    created.append(result.tag)
    assert result.manifest["runtime"] == "sklearn"
    assert result.manifest["runtime_options"] == {"serialization": "joblib"}


def test_skops_types_are_refused_without_trust_and_listed_in_the_manifest_with_it(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str], logistic: Pipeline
) -> None:
    model_file = adult.folder / "model.skops"
    skops.io.dump(logistic, model_file)
    untrusted = skops.io.get_untrusted_types(file=model_file)
    assert untrusted == ["_operator.neg"]

    with pytest.raises(ConfigError) as caught:
        wrap_file(model_file, adult_models.POLICY_FILE, adult.data_file, master_key)
    message = _message(caught)
    assert "model.skops" in message and "_operator.neg" in message and "trust" in message

    result = wrap_file(
        model_file,
        adult_models.POLICY_FILE,
        adult.data_file,
        master_key,
        trust=True,
        name="gs_wrap_skops",
    )
    created.append(result.tag)
    assert result.manifest["runtime_options"] == {
        "serialization": "skops",
        "trusted_types": ["_operator.neg"],
    }
    # The server loads it back with exactly those types trusted.
    loaded = open_model(result.tag, master_key)
    rows = adult_models.records(adult.frame.head(5), adult.policy)
    scores = loaded.runtime.predict_score(ModelInput(rows, loaded.encoder))
    expected = logistic.predict_proba(adult.frame.head(5)[adult.policy.feature_names])[:, 1]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_onnx_of_another_width_is_refused(adult: Adult, master_key: vault.FileKeyProvider) -> None:
    x = np.random.default_rng(SEED).normal(size=(60, 5)).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    model_file = adult.folder / "narrow.onnx"
    model_file.write_bytes(
        to_onnx(
            model, initial_types=[("features", FloatTensorType([None, 5]))], target_opset=17
        ).SerializeToString()
    )

    with pytest.raises(ConfigError) as caught:
        wrap_file(model_file, adult_models.POLICY_FILE, adult.data_file, master_key)
    message = _message(caught)
    assert "features" in message  # the ONNX input's name
    width = TabularEncoder(adult.policy).n_columns
    assert re.search(rf"\b{width}\b", message) and re.search(r"\b5\b", message)


def test_probabilities_outside_zero_one_are_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    output = {**adult.policy.output.model_dump(), "model_output": "probability"}
    policy = _named(adult.policy, "gs_wrap_five", output=output)

    with pytest.raises(ConfigError) as caught:
        _wrap(
            adult,
            created,
            "gs_wrap_five",
            policy=policy,
            runtime="torchscript",
            model_bytes=_scripted(_Constant(5.0)),
            provider=master_key,
        )
    message = _message(caught)
    assert "[0, 1]" in message and "model_output" in message and "margin" in message


def test_non_finite_scores_are_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        _wrap(
            adult,
            created,
            "gs_wrap_nan",
            runtime="torchscript",
            model_bytes=_scripted(_Constant(math.nan)),
            provider=master_key,
        )
    assert "non-finite" in _message(caught)


def test_fewer_than_twenty_rows_are_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        _wrap(adult, created, "gs_wrap_few", train=adult.frame.head(19), provider=master_key)
    message = _message(caught)
    assert "20" in message and "19" in message


def test_an_unknown_runtime_kind_is_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        _wrap(adult, created, "gs_wrap_kind", runtime="lightgbm", provider=master_key)
    assert "lightgbm" in _message(caught)


# Known bugs, kept visible until fixed


def _one_category_fewer(policy: Policy, name: str) -> Policy:
    data = policy.model_dump()
    for feature in data["features"]:
        if feature["name"] == "workclass":
            feature["categories"] = [c for c in feature["categories"] if c != "Without-pay"]
    return Policy.model_validate({**data, "model": name})


def test_an_xgboost_model_of_another_width_is_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    policy = _one_category_fewer(adult.policy, "gs_wrap_narrow_xgb")
    frame = adult.frame[adult.frame["workclass"] != "Without-pay"]

    with pytest.raises(ConfigError):
        _wrap(adult, created, policy.model, policy=policy, train=frame, provider=master_key)


def test_too_few_training_rows_beside_calibration_rows_are_refused(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    with pytest.raises(ConfigError):
        _wrap(
            adult,
            created,
            "gs_wrap_tiny",
            train=adult.frame.head(3),
            calibration=adult.frame.tail(50),
            provider=master_key,
        )


# Success: what a wrapped model carries


@pytest.fixture(scope="module")
def wrapped(adult: Adult, master_key: vault.FileKeyProvider, created: list[str]):
    result = wrap_file(
        adult.xgboost_file,
        adult_models.POLICY_FILE,
        adult.data_file,
        master_key,
        labels={"team": "risk"},
        name="gs_wrap_ok",
    )
    created.append(result.tag)
    return result


def test_the_manifest_records_runtime_explainer_calibration_and_hashes(
    adult: Adult, master_key: vault.FileKeyProvider, wrapped
) -> None:
    manifest = wrapped.manifest

    assert manifest["runtime"] == "xgboost"
    assert manifest["runtime_options"] == {}
    assert manifest["output_space"] == "margin"
    assert manifest["explainer"]["method"] == "tree_shap"
    assert manifest["model_sha256"] == hashlib.sha256(adult.xgboost_file.read_bytes()).hexdigest()
    assert manifest["key_id"] == master_key.key_id
    anomaly = manifest["calibration"]["anomaly"]
    assert anomaly["method"] == "knn_distance"
    assert math.isfinite(anomaly["threshold"]) and anomaly["threshold"] > 0
    assert anomaly["target_fpr"] == adult.policy.guards.anomaly.target_fpr
    rows = manifest["data"]["train_rows"] + manifest["data"]["calibration_rows"]
    assert rows == len(adult.frame)
    assert anomaly["calibration_rows"] == manifest["data"]["calibration_rows"]
    assert set(manifest["libraries"]) >= {"python", "bentoml", "xgboost", "numpy"}
    # The readable copy beside the sealed artifact says the same.
    stored = bentoml.models.get(wrapped.tag)
    copy = json.loads(Path(stored.path_of(MANIFEST_FILE)).read_text(encoding="utf-8"))
    assert copy == manifest


def test_labels_land_on_the_bentoml_model(wrapped) -> None:
    labels = bentoml.models.get(wrapped.tag).info.labels

    assert labels == {STORE_LABEL: "true", "team": "risk"}


def test_wrap_file_name_overrides_the_policys_model(adult: Adult, wrapped) -> None:
    assert adult.policy.model == "adult_income"
    assert wrapped.tag.startswith("gs_wrap_ok:")
    assert wrapped.manifest["name"] == "gs_wrap_ok"
    assert wrapped.manifest["version"] == wrapped.tag.split(":", 1)[1]
    stored = bentoml.models.get(wrapped.tag)
    policy = Policy.from_file(stored.path_of(POLICY_FILE))
    assert policy.model == "gs_wrap_ok"
    assert policy.features == adult.policy.features


def test_the_wrapped_model_opens_and_scores_like_the_booster(
    adult: Adult, master_key: vault.FileKeyProvider, wrapped
) -> None:
    import xgboost as xgb

    loaded = open_model(wrapped.tag, master_key)
    rows = ModelInput(adult_models.records(adult.frame.head(8), adult.policy), loaded.encoder)
    booster = xgb.Booster(model_file=str(adult.xgboost_file))

    expected = booster.predict(xgb.DMatrix(rows.matrix), output_margin=True)
    np.testing.assert_allclose(loaded.runtime.predict_score(rows), expected, atol=1e-6)
    assert loaded.explainer.method == "tree_shap"


# Selecting models by label


def test_tags_with_label_returns_the_newest_version_per_name(
    adult: Adult, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    suite = f"gs-{uuid.uuid4().hex[:8]}"
    mine, other = {"suite": suite}, {"suite": suite + "-other"}
    first = _wrap(adult, created, "gs_label_a", labels=mine, provider=master_key)
    newest = _wrap(adult, created, "gs_label_a", labels=mine, provider=master_key)
    second = _wrap(adult, created, "gs_label_b", labels=mine, provider=master_key)
    _wrap(adult, created, "gs_label_c", labels=other, provider=master_key)

    tags = tags_with_label(f"suite={suite}")

    assert first.tag != newest.tag
    assert tags == sorted([newest.tag, second.tag])
    assert tags_with_label(f"suite={suite}-none") == []


@pytest.mark.parametrize("label", ["suite", "=a", "", "suite:a"])
def test_tags_with_label_refuses_a_malformed_label(label: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tags_with_label(label)
    message = _message(caught)
    assert "key=value" in message
