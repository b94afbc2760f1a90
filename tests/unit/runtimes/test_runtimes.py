"""Model runtimes: each kind loads from bytes in memory and scores as its own library does."""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import skops.io
import torch
import xgboost as xgb
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from guarded_serving.encoding import TabularEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.policy import CategoricalFeature, Policy
from guarded_serving.runtimes import load_runtime
from guarded_serving.runtimes.base import RUNTIME_KINDS, ModelInput
from guarded_serving.runtimes.onnx import OnnxRuntime
from guarded_serving.runtimes.sklearn import SklearnRuntime
from guarded_serving.runtimes.torch import TorchScriptRuntime
from guarded_serving.runtimes.xgboost import XGBoostRuntime
from tests import adult_models

SEED = 11


@dataclass(frozen=True)
class Adult:
    """The Adult policy, a small training sample and encoded test rows."""

    policy: Policy
    encoder: TabularEncoder
    train: pd.DataFrame
    test: pd.DataFrame
    inputs: ModelInput
    folder: Path


@pytest.fixture(scope="module")
def adult(tmp_path_factory: pytest.TempPathFactory) -> Adult:
    policy, train, test = adult_models.load()
    encoder = TabularEncoder(policy)
    test = test.head(40).reset_index(drop=True)
    inputs = ModelInput(adult_models.records(test, policy), encoder)
    folder = tmp_path_factory.mktemp("runtime-models")
    return Adult(policy, encoder, train.head(600), test, inputs, folder)


@pytest.fixture(scope="module")
def logistic_matrix(adult: Adult) -> LogisticRegression:
    """A logistic regression on the policy's one-hot matrix."""
    matrix = adult.encoder.encode(adult_models.records(adult.train, adult.policy))
    model = Pipeline([("scale", StandardScaler()), ("logit", LogisticRegression(max_iter=500))])
    return model.fit(matrix, adult.train["income"])


def _scripted(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


class _Logits(torch.nn.Module):
    """A small MLP over the one-hot matrix whose last layer has ``outputs`` logits."""

    def __init__(self, columns: int, outputs: int, squeeze: bool) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(columns, 8), torch.nn.Tanh(), torch.nn.Linear(8, outputs)
        )
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x / 1000.0)
        return out.squeeze(-1) if self.squeeze else out


# xgboost


def test_xgboost_loads_from_bytes_and_returns_the_boosters_margin(adult: Adult) -> None:
    path = adult_models.train_xgboost(adult.policy, adult.train, adult.folder, rounds=15)
    booster = xgb.Booster(model_file=str(path))

    runtime = load_runtime("xgboost", path.read_bytes(), adult.encoder)

    assert isinstance(runtime, XGBoostRuntime)
    assert (runtime.kind, runtime.output_space) == ("xgboost", "margin")
    expected = booster.predict(xgb.DMatrix(adult.inputs.matrix), output_margin=True)
    scores = runtime.predict_score(adult.inputs)
    assert scores.dtype == np.float64 and scores.shape == (len(adult.inputs),)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    # Its own binary serialization loads back to the same model.
    again = XGBoostRuntime.from_bytes(runtime.to_bytes())
    np.testing.assert_array_equal(again.predict_score(adult.inputs), scores)


# scikit-learn


@pytest.fixture(scope="module")
def sklearn_pipeline(adult: Adult) -> Pipeline:
    estimator = Pipeline(
        [("scale", StandardScaler()), ("logit", LogisticRegression(max_iter=500))]
    )
    pipeline = adult_models.sklearn_pipeline(adult.policy, estimator)
    return pipeline.fit(adult.train[adult.policy.feature_names], adult.train["income"])


@pytest.mark.parametrize("serialization", ["skops", "joblib"])
def test_sklearn_loads_from_bytes_and_returns_predict_proba(
    adult: Adult, sklearn_pipeline: Pipeline, serialization: str
) -> None:
    if serialization == "skops":
        model_bytes = skops.io.dumps(sklearn_pipeline)
        options = {"serialization": "skops", "trusted_types": []}
    else:
        buffer = io.BytesIO()
        joblib.dump(sklearn_pipeline, buffer)
        model_bytes = buffer.getvalue()
        options = {"serialization": "joblib"}

    runtime = load_runtime("sklearn", model_bytes, adult.encoder, options=options)

    assert isinstance(runtime, SklearnRuntime)
    assert (runtime.kind, runtime.output_space) == ("sklearn", "probability")
    expected = sklearn_pipeline.predict_proba(adult.test[adult.policy.feature_names])[:, 1]
    np.testing.assert_allclose(runtime.predict_score(adult.inputs), expected, rtol=1e-12)


def test_sklearn_refuses_an_unknown_serialization_and_a_non_classifier(adult: Adult) -> None:
    with pytest.raises(ConfigError, match="serialization"):
        SklearnRuntime.from_bytes(pickle.dumps(None), adult.encoder, serialization="pickle")
    with pytest.raises(ConfigError, match="predict_proba"):
        SklearnRuntime(StandardScaler(), adult.encoder)


# ONNX


def _direct_columns(session: ort.InferenceSession, frame: pd.DataFrame, policy: Policy) -> dict:
    """Feeds of a per-column model, built independently of the runtime."""
    feeds = {}
    for feature in policy.features:
        column = frame[feature.name].to_numpy().reshape(-1, 1)
        if isinstance(feature, CategoricalFeature):
            feeds[feature.name] = column.astype(object)
        else:
            feeds[feature.name] = column.astype(np.int64)
    return feeds


def test_onnx_per_column_model_is_fed_one_input_per_feature(adult: Adult) -> None:
    path = adult_models.train_onnx(adult.policy, adult.train, adult.folder)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == len(adult.policy.features)

    runtime = load_runtime("onnx", path.read_bytes(), adult.encoder)

    assert isinstance(runtime, OnnxRuntime)
    assert runtime._feed == "columns"
    assert runtime.output_space == "probability"
    (probabilities,) = session.run(
        ["probabilities"], _direct_columns(session, adult.test, adult.policy)
    )
    np.testing.assert_allclose(
        runtime.predict_score(adult.inputs), probabilities[:, 1], rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("zipmap", [False, True])
def test_onnx_single_matrix_model_is_fed_the_one_hot_matrix(
    adult: Adult, logistic_matrix: Pipeline, zipmap: bool
) -> None:
    onnx_model = to_onnx(
        logistic_matrix,
        initial_types=[("x", FloatTensorType([None, adult.encoder.n_columns]))],
        options={id(logistic_matrix): {"zipmap": zipmap}},
        target_opset=17,
    )
    model_bytes = onnx_model.SerializeToString()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])

    runtime = OnnxRuntime.from_bytes(model_bytes, adult.encoder)

    assert runtime._feed == "matrix"
    scores = runtime.predict_score(adult.inputs)
    output = "output_probability" if zipmap else "probabilities"
    (direct,) = session.run([output], {"x": adult.inputs.matrix})
    if zipmap:
        direct = np.array([[row[0], row[1]] for row in direct])
    np.testing.assert_allclose(scores, direct[:, 1], rtol=0, atol=1e-7)
    # ONNX computes in float32; scikit-learn's own probabilities agree closely.
    expected = logistic_matrix.predict_proba(adult.inputs.matrix)[:, 1]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def test_onnx_per_column_and_single_matrix_models_of_one_classifier_agree(
    adult: Adult, logistic_matrix: Pipeline
) -> None:
    """The two feeding modes give the same scores for the same underlying model."""
    matrix_model = to_onnx(
        logistic_matrix,
        initial_types=[("x", FloatTensorType([None, adult.encoder.n_columns]))],
        options={id(logistic_matrix): {"zipmap": False}},
        target_opset=17,
    ).SerializeToString()
    column_model = adult_models.train_onnx(adult.policy, adult.train, adult.folder).read_bytes()
    by_matrix = OnnxRuntime.from_bytes(matrix_model, adult.encoder)
    by_column = OnnxRuntime.from_bytes(column_model, adult.encoder)

    # Both are a scaled logistic regression on the same one-hot columns and rows.
    np.testing.assert_allclose(
        by_matrix.predict_score(adult.inputs),
        by_column.predict_score(adult.inputs),
        rtol=0,
        atol=1e-4,
    )


def test_onnx_refuses_inputs_that_fit_neither_feeding_mode(adult: Adult) -> None:
    x = np.random.default_rng(SEED).normal(size=(60, 3)).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    onnx_model = to_onnx(
        model, initial_types=[("x", FloatTensorType([None, 3]))], target_opset=17
    ).SerializeToString()

    with pytest.raises(ConfigError) as caught:
        OnnxRuntime.from_bytes(onnx_model, adult.encoder)
    # The message names the input, its width and the width the policy encodes.
    message = caught.value.message
    assert "ONNX input x" in message
    assert re.search(r"\b3\b", message)
    assert re.search(rf"\b{adult.encoder.n_columns}\b", message)


# TorchScript


def test_torchscript_returns_the_modules_logits(adult: Adult) -> None:
    torch.manual_seed(SEED)
    module = _Logits(adult.encoder.n_columns, 1, squeeze=True)
    runtime = load_runtime("torchscript", _scripted(module), adult.encoder)

    assert isinstance(runtime, TorchScriptRuntime)
    assert runtime.output_space == "margin"
    with torch.no_grad():
        expected = module(torch.from_numpy(adult.inputs.matrix)).double().numpy()
    np.testing.assert_allclose(runtime.predict_score(adult.inputs), expected, rtol=0, atol=1e-6)


def test_torchscript_n_by_1_output_is_one_logit_per_row(adult: Adult) -> None:
    torch.manual_seed(SEED)
    module = _Logits(adult.encoder.n_columns, 1, squeeze=False)
    runtime = TorchScriptRuntime.from_bytes(_scripted(module))

    with torch.no_grad():
        expected = module(torch.from_numpy(adult.inputs.matrix))[:, 0].double().numpy()
    scores = runtime.predict_score(adult.inputs)
    assert scores.shape == (len(adult.inputs),)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)


def test_torchscript_two_class_logits_give_their_difference(adult: Adult) -> None:
    torch.manual_seed(SEED)
    module = _Logits(adult.encoder.n_columns, 2, squeeze=False)
    runtime = TorchScriptRuntime.from_bytes(_scripted(module))

    with torch.no_grad():
        logits = module(torch.from_numpy(adult.inputs.matrix)).double().numpy()
    scores = runtime.predict_score(adult.inputs)
    assert scores.shape == (len(adult.inputs),)
    np.testing.assert_allclose(scores, logits[:, 1] - logits[:, 0], rtol=0, atol=1e-6)


def test_torchscript_output_space_follows_the_policy_override(adult: Adult) -> None:
    torch.manual_seed(SEED)
    model_bytes = _scripted(_Logits(adult.encoder.n_columns, 1, squeeze=True))

    runtime = load_runtime("torchscript", model_bytes, adult.encoder, output_space="probability")

    assert runtime.output_space == "probability"


@pytest.mark.parametrize("model_bytes", [b"", b"not a zip archive", pickle.dumps({"w": 1})])
def test_torchscript_refuses_bytes_that_are_not_a_module(model_bytes: bytes) -> None:
    with pytest.raises(ConfigError, match="TorchScript") as caught:
        TorchScriptRuntime.from_bytes(model_bytes)
    assert caught.value.code == "config_error"


# Lookup by kind


def test_load_runtime_refuses_an_unknown_kind(adult: Adult) -> None:
    with pytest.raises(ConfigError, match="lightgbm") as caught:
        load_runtime("lightgbm", b"", adult.encoder)
    for kind in RUNTIME_KINDS:
        assert kind in caught.value.message
