"""Choosing each model's explainer at wrap time, and rebuilding it from the manifest."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from guarded_serving.encoding import TabularEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.explain import select
from guarded_serving.explain.gradient import IntegratedGradientsExplainer
from guarded_serving.explain.kernel import KernelShapExplainer
from guarded_serving.explain.tree import SklearnTreeExplainer, XGBoostTreeExplainer
from guarded_serving.policy import CategoricalFeature, Policy
from guarded_serving.runtimes import Runtime, load_runtime
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.runtimes.onnx import OnnxRuntime
from guarded_serving.runtimes.sklearn import SklearnRuntime
from guarded_serving.runtimes.torch import TorchScriptRuntime
from tests import adult_models

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
]

SEED = 13


@dataclass(frozen=True)
class Adult:
    policy: Policy
    encoder: TabularEncoder
    train: ModelInput
    check: ModelInput
    labels: np.ndarray
    frame: Any


@pytest.fixture(scope="module")
def adult() -> Adult:
    policy, train, test = adult_models.load()
    encoder = TabularEncoder(policy)
    train = train.head(600).reset_index(drop=True)
    return Adult(
        policy,
        encoder,
        ModelInput(adult_models.records(train, policy), encoder),
        ModelInput(adult_models.records(test.head(32), policy), encoder),
        train["income"].to_numpy(),
        train,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("select-models")


class _MLP(torch.nn.Module):
    """A seeded tanh network over the one-hot matrix, standardized by fixed buffers."""

    def __init__(self, matrix: np.ndarray, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        x = torch.from_numpy(matrix)
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp_min(1e-3))
        self.body = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std).squeeze(-1)


def _scripted(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def _exported(module: torch.nn.Module, columns: int) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(
        module.eval(),
        (torch.zeros(2, columns),),
        buffer,
        input_names=["x"],
        output_names=["logit"],
        dynamic_axes={"x": {0: "rows"}, "logit": {0: "rows"}},
        dynamo=False,
    )
    return buffer.getvalue()


@dataclass(frozen=True)
class Models:
    """One loaded runtime per kind this module covers, and the torch module bytes."""

    xgboost: Runtime
    hgb_one_hot: SklearnRuntime
    hgb_native: SklearnRuntime
    torchscript: TorchScriptRuntime
    onnx_sklearn: OnnxRuntime
    onnx_torch: OnnxRuntime
    torch_module: bytes
    other_module: bytes


@pytest.fixture(scope="module")
def models(adult: Adult, folder) -> Models:
    policy, encoder, frame = adult.policy, adult.encoder, adult.frame
    xgb_path = adult_models.train_xgboost(policy, frame, folder, rounds=15)

    one_hot = adult_models.sklearn_pipeline(
        policy, HistGradientBoostingClassifier(max_iter=15, random_state=SEED)
    ).fit(frame[policy.feature_names], adult.labels)

    categorical = [f for f in policy.features if isinstance(f, CategoricalFeature)]
    numeric = [f.name for f in policy.features if not isinstance(f, CategoricalFeature)]
    ordinal = ColumnTransformer(
        [("categories", OrdinalEncoder(categories=[list(f.categories) for f in categorical]),
          [f.name for f in categorical]),
         ("numbers", "passthrough", numeric)]
    )  # fmt: skip
    native = Pipeline(
        [("encode", ordinal),
         ("model", HistGradientBoostingClassifier(
             max_iter=15, random_state=SEED, categorical_features=list(range(len(categorical)))))]
    ).fit(frame[policy.feature_names], adult.labels)  # fmt: skip

    matrix = adult.train.matrix
    module = _MLP(matrix, seed=SEED)
    module_bytes = _scripted(module)
    onnx_path = adult_models.train_onnx(policy, frame, folder)
    return Models(
        xgboost=load_runtime("xgboost", xgb_path.read_bytes(), encoder),
        hgb_one_hot=SklearnRuntime(one_hot, encoder),
        hgb_native=SklearnRuntime(native, encoder),
        torchscript=TorchScriptRuntime.from_bytes(module_bytes),
        onnx_sklearn=OnnxRuntime.from_bytes(onnx_path.read_bytes(), encoder),
        onnx_torch=OnnxRuntime.from_bytes(
            _exported(module, encoder.n_columns), encoder, output_space="margin"
        ),
        torch_module=module_bytes,
        other_module=_scripted(_MLP(matrix, seed=SEED + 1)),
    )


def _choose(runtime: Runtime, adult: Adult, policy: Policy | None = None, **kwargs):
    return select.choose(runtime, policy or adult.policy, adult.train, adult.check, **kwargs)


def _with_method(policy: Policy, method: str) -> Policy:
    return Policy.model_validate(
        {
            **policy.model_dump(),
            "explanation": {**policy.explanation.model_dump(), "method": method},
        }
    )


# What is chosen


def test_xgboost_gets_its_native_tree_shap(adult: Adult, models: Models) -> None:
    choice = _choose(models.xgboost, adult)

    assert choice.method == "tree_shap"
    assert choice.options == {"engine": "xgboost"}
    assert choice.files == {} and choice.notes == []


def test_one_hot_hgb_pipeline_gets_tree_shap_verified_on_the_check_rows(
    adult: Adult, models: Models
) -> None:
    choice = _choose(models.hgb_one_hot, adult)

    assert choice.method == "tree_shap"
    assert choice.options["engine"] == "shap"
    assert choice.options["output_space"] == "log_odds"
    assert 0 <= choice.options["verified_max_error"] <= 1e-6
    # One group of transformed columns per policy feature, categories' blocks whole.
    groups = choice.options["column_groups"]
    assert len(groups) == len(adult.policy.features)
    sizes = [
        len(f.categories) if isinstance(f, CategoricalFeature) else 1
        for f in adult.policy.features
    ]
    assert [len(g) for g in groups] == sizes
    assert sorted(c for g in groups for c in g) == list(range(adult.encoder.n_columns))


def test_hgb_with_native_categories_falls_back_to_kernel_shap_and_says_why(
    adult: Adult, models: Models
) -> None:
    choice = _choose(models.hgb_native, adult)

    assert choice.method == "kernel_shap"
    assert len(choice.notes) == 1
    note = choice.notes[0]
    assert "TreeSHAP" in note and "categorical" in note
    assert "one-hot" in note  # and what to do about it
    background = np.load(io.BytesIO(choice.files["background.npy"]))
    assert background.shape == (
        adult.policy.explanation.kernel.background_rows,
        len(adult.policy.features),
    )


def test_torchscript_gets_integrated_gradients(adult: Adult, models: Models) -> None:
    choice = _choose(models.torchscript, adult)

    assert choice.method == "integrated_gradients"
    assert choice.options["steps"] >= adult.policy.explanation.gradient.steps
    assert choice.options["verified_max_gap"] <= adult.policy.explanation.gradient.tolerance / 2
    background = np.load(io.BytesIO(choice.files["background.npy"]))
    assert background.shape == (
        adult.policy.explanation.gradient.background_rows,
        adult.encoder.n_columns,
    )
    # The module is the served model itself: nothing extra to keep.
    assert "explainer_module.pt" not in choice.files


def test_onnx_without_a_torch_module_gets_kernel_shap(adult: Adult, models: Models) -> None:
    for runtime in (models.onnx_sklearn, models.onnx_torch):
        choice = _choose(runtime, adult)

        assert choice.method == "kernel_shap"
        assert set(choice.files) == {"background.npy"}


def test_onnx_exported_from_torch_gets_gradients_from_the_supplied_module(
    adult: Adult, models: Models
) -> None:
    choice = _choose(models.onnx_torch, adult, torch_module=models.torch_module)

    assert choice.method == "integrated_gradients"
    assert choice.files["explainer_module.pt"] == models.torch_module
    assert choice.options["verified_max_gap"] <= adult.policy.explanation.gradient.tolerance


def test_a_torch_module_that_disagrees_with_the_onnx_model_is_refused(
    adult: Adult, models: Models
) -> None:
    with pytest.raises(ConfigError, match="disagree") as caught:
        _choose(models.onnx_torch, adult, torch_module=models.other_module)
    assert caught.value.code == "config_error"


@pytest.mark.parametrize(
    ("kind", "method", "words"),
    [
        ("xgboost", "gradient", ("gradient", "TorchScript")),
        ("onnx_sklearn", "gradient", ("gradient", "TorchScript")),
        ("hgb_native", "tree_shap", ("tree_shap", "categorical")),
        ("torchscript", "tree_shap", ("tree_shap",)),
    ],
)
def test_a_method_the_model_cannot_have_is_refused(
    adult: Adult, models: Models, kind: str, method: str, words: tuple[str, ...]
) -> None:
    policy = _with_method(adult.policy, method)

    with pytest.raises(ConfigError) as caught:
        _choose(getattr(models, kind), adult, policy)
    for word in words:
        assert word in caught.value.message


def test_kernel_shap_can_be_asked_for_on_a_tree_model(adult: Adult, models: Models) -> None:
    choice = _choose(models.xgboost, adult, _with_method(adult.policy, "kernel_shap"))

    assert choice.method == "kernel_shap"


# Rebuilding from the manifest


def _reference(kind: str, choice: select.ExplainerChoice, adult: Adult, models: Models):
    """The explainer the manifest describes, built directly from what was chosen."""
    runtime = getattr(models, kind)
    policy, encoder = adult.policy, adult.encoder
    background = (
        np.load(io.BytesIO(choice.files["background.npy"]))
        if "background.npy" in choice.files
        else None
    )
    if kind == "xgboost":
        return XGBoostTreeExplainer(runtime, encoder)
    if kind == "hgb_one_hot":
        return SklearnTreeExplainer(
            runtime, encoder, choice.options["column_groups"], choice.options["output_space"]
        )
    if choice.method == "integrated_gradients":
        settings = policy.explanation.gradient.model_copy(
            update={"steps": choice.options["steps"]}
        )
        module = TorchScriptRuntime.from_bytes(models.torch_module)
        return IntegratedGradientsExplainer(
            module.forward, encoder, background, settings, policy.explanation.gradient.tolerance
        )
    return KernelShapExplainer(runtime, encoder, background, policy.explanation.kernel)


@pytest.mark.parametrize(
    ("kind", "method", "with_module"),
    [
        ("xgboost", "tree_shap", False),
        ("hgb_one_hot", "tree_shap", False),
        ("torchscript", "integrated_gradients", False),
        ("onnx_torch", "integrated_gradients", True),
        ("onnx_sklearn", "kernel_shap", False),
    ],
)
def test_build_from_the_manifest_gives_the_same_attributions(
    adult: Adult, models: Models, kind: str, method: str, with_module: bool
) -> None:
    runtime = getattr(models, kind)
    module = models.torch_module if with_module else None
    choice = _choose(runtime, adult, torch_module=module)
    assert choice.method == method
    # The manifest travels as JSON inside the sealed artifact.
    manifest = json.loads(json.dumps(choice.manifest()))
    rows = ModelInput(adult.check.records[:4], adult.encoder)

    built = select.build(manifest, runtime, adult.encoder, adult.policy, dict(choice.files))
    reference = _reference(kind, choice, adult, models)

    assert built.method == reference.method == method
    got, want = _explained(built.explain, rows), _explained(reference.explain, rows)
    assert [e.output_space for e in got] == [e.output_space for e in want]
    for mine, theirs in zip(got, want, strict=True):
        assert mine.status == theirs.status == "ok"
        assert list(mine.attributions) == adult.policy.feature_names
        np.testing.assert_allclose(
            list(mine.attributions.values()), list(theirs.attributions.values()), atol=1e-9
        )
        assert mine.base_value == pytest.approx(theirs.base_value, abs=1e-9)


def _explained(explain: Callable, rows: ModelInput) -> list:
    np.random.seed(SEED)  # KernelSHAP samples coalitions from numpy's global generator
    return explain(rows)


def test_build_refuses_an_unknown_method(adult: Adult, models: Models) -> None:
    with pytest.raises(ConfigError, match="lime"):
        select.build({"method": "lime"}, models.xgboost, adult.encoder, adult.policy, {})
