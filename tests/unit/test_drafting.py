"""Drafting a policy from a model file and a data sample, for a person to review."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
import pandas as pd
import pytest
import skops.io
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from guarded_serving import vault
from guarded_serving.drafting import (
    MAX_CATEGORIES,
    RANGE_MARGIN,
    draft_policy,
    draft_policy_text,
    model_input_names,
)
from guarded_serving.encoding import TabularEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.policy import CategoricalFeature, NumericFeature, Policy
from guarded_serving.wrap import wrap_file, wrap_model
from tests import adult_models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")

SEED = 19
KINDS = ("xgboost", "sklearn", "onnx", "torchscript")
PROTECTED = ["sex", "race"]
EXPLAINER = {
    "xgboost": "tree_shap",
    "sklearn": "tree_shap",
    "onnx": "kernel_shap",
    "torchscript": "integrated_gradients",
}


@dataclass(frozen=True)
class Sample:
    """The Adult training rows as a user's CSV, the reference policy and one model per kind."""

    policy: Policy
    frame: pd.DataFrame
    data_file: Path
    models: dict[str, Path]
    folder: Path


def _train_hgb(policy: Policy, train: pd.DataFrame, out: Path) -> Path:
    pipeline = adult_models.sklearn_pipeline(
        policy, HistGradientBoostingClassifier(max_iter=10, random_state=SEED)
    )
    pipeline.fit(train[policy.feature_names], train["income"])
    path = out / "model.skops"
    skops.io.dump(pipeline, path)
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    policy, train, _ = adult_models.load()
    folder = tmp_path_factory.mktemp("drafting")
    frame = train.drop(columns=["split"])
    data_file = folder / "train.csv"
    frame.to_csv(data_file, index=False)
    models = {
        "xgboost": adult_models.train_xgboost(policy, train, folder, rounds=10),
        "sklearn": _train_hgb(policy, train, folder),
        "onnx": adult_models.train_onnx(policy, train, folder),
        "torchscript": adult_models.train_torchscript(policy, train, folder, epochs=5),
    }
    return Sample(policy, frame, data_file, models, folder)


@pytest.fixture(scope="module")
def created() -> Iterator[list[str]]:
    tags: list[str] = []
    yield tags
    for tag in tags:
        bentoml.models.delete(tag)


def _draft(sample: Sample, kind: str, data_file: Path | None = None, **kwargs) -> Policy:
    kwargs.setdefault("exclude", ["income"])
    kwargs.setdefault("protected", PROTECTED)
    data_file = data_file or sample.data_file
    return draft_policy(sample.models[kind], data_file, f"gs_draft_{kind}", trust=True, **kwargs)


def _csv(sample: Sample, frame: pd.DataFrame, name: str) -> Path:
    path = sample.folder / name
    frame.to_csv(path, index=False)
    return path


# Types, ranges and categories


@pytest.mark.parametrize("kind", KINDS)
def test_features_get_types_ranges_and_categories_from_the_data(sample: Sample, kind: str) -> None:
    draft = _draft(sample, kind)

    assert draft.model == f"gs_draft_{kind}"
    assert draft.feature_names == sample.policy.feature_names
    for feature in draft.features:
        values = sample.frame[feature.name]
        if isinstance(feature, CategoricalFeature):
            assert feature.categories == sorted(values.unique())
            continue
        assert isinstance(feature, NumericFeature)
        assert feature.type == "integer"  # every Adult number is a whole number
        low, high = float(values.min()), float(values.max())
        span = high - low
        assert feature.max == math.ceil(high + span * RANGE_MARGIN)
        assert feature.min <= low and feature.max > high
        assert float(feature.min).is_integer() and float(feature.max).is_integer()
        if low > span * RANGE_MARGIN:  # room to widen below without crossing zero
            assert feature.min == math.floor(low - span * RANGE_MARGIN)
        else:  # non-negative data never gets a negative minimum
            assert feature.min == 0


def test_float_and_negative_columns_are_widened_both_ways(sample: Sample) -> None:
    rng = np.random.default_rng(SEED)
    frame = sample.frame.copy()
    frame["ratio"] = rng.uniform(0.5, 2.5, size=len(frame))
    frame["balance"] = rng.integers(-300, 700, size=len(frame))
    frame["share"] = rng.uniform(0.0, 1.0, size=len(frame))
    path = _csv(sample, frame, "extra.csv")

    # The xgboost model names no inputs: every data column not excluded is a feature.
    features = {f.name: f for f in _draft(sample, "xgboost", path).features}

    ratio, balance, share = features["ratio"], features["balance"], features["share"]
    assert ratio.type == "float" and share.type == "float" and balance.type == "integer"
    low, high = frame["ratio"].min(), frame["ratio"].max()
    assert ratio.min == pytest.approx(low - (high - low) * RANGE_MARGIN)
    assert ratio.max == pytest.approx(high + (high - low) * RANGE_MARGIN)
    low, high = frame["balance"].min(), frame["balance"].max()
    assert balance.min == math.floor(low - (high - low) * RANGE_MARGIN) < low < 0
    assert balance.max == math.ceil(high + (high - low) * RANGE_MARGIN)
    # Non-negative data keeps a floor of zero; the top is widened as usual.
    assert share.min == 0.0 and share.max > frame["share"].max()


def test_string_columns_become_sorted_categories_of_every_seen_value(sample: Sample) -> None:
    draft = _draft(sample, "torchscript")

    categories = {f.name: f.categories for f in draft.features if f.type == "category"}
    assert set(categories) == {"workclass", "marital_status", "occupation", "relationship"}
    for name, seen in categories.items():
        assert seen == sorted(set(sample.frame[name]))


def test_exclude_drops_the_target(sample: Sample) -> None:
    with_target = _draft(sample, "xgboost", exclude=[])
    without = _draft(sample, "xgboost")

    assert "income" in with_target.feature_names
    assert "income" not in without.feature_names
    assert with_target.feature_names == [*without.feature_names, "income"]


def test_protected_columns_become_attributes_with_their_groups_not_features(
    sample: Sample,
) -> None:
    draft = _draft(sample, "xgboost")

    groups = {a.name: a.groups for a in draft.protected_attributes}
    assert groups == {
        "sex": ["Female", "Male"],
        "race": sorted(set(sample.frame["race"])),
    }
    assert not set(PROTECTED) & set(draft.feature_names)
    # Nothing is protected unless named.
    unnamed = _draft(sample, "xgboost", protected=None, exclude=["income", *PROTECTED])
    assert unnamed.protected_attributes == []


def test_a_protected_column_missing_from_the_data_is_refused(sample: Sample) -> None:
    with pytest.raises(ConfigError) as caught:
        _draft(sample, "xgboost", protected=["sex", "religion"])
    assert "religion" in caught.value.message


def test_a_target_column_missing_from_the_data_is_refused(sample: Sample) -> None:
    with pytest.raises(ConfigError) as caught:
        _draft(sample, "xgboost", exclude=["label"])
    assert "label" in caught.value.message


def test_too_many_distinct_strings_are_refused(sample: Sample) -> None:
    frame = sample.frame.copy()
    frame["person"] = [f"p{i % (MAX_CATEGORIES + 1):04d}" for i in range(len(frame))]
    path = _csv(sample, frame, "ids.csv")

    with pytest.raises(ConfigError) as caught:
        _draft(sample, "xgboost", path)
    message = caught.value.message
    assert "person" in message and str(MAX_CATEGORIES + 1) in message

    # At the limit, the column is still a category.
    frame["person"] = [f"p{i % MAX_CATEGORIES:04d}" for i in range(len(frame))]
    features = {
        f.name: f for f in _draft(sample, "xgboost", _csv(sample, frame, "ok.csv")).features
    }
    assert len(features["person"].categories) == MAX_CATEGORIES


# The model's input names


def test_model_input_names_are_read_where_the_model_declares_them(sample: Sample) -> None:
    names = {kind: model_input_names(path, trust=True) for kind, path in sample.models.items()}

    assert names["sklearn"] == sample.policy.feature_names
    assert names["onnx"] == sample.policy.feature_names
    assert names["xgboost"] is None and names["torchscript"] is None


@pytest.mark.parametrize("kind", ["sklearn", "onnx"])
def test_the_models_input_order_wins_over_the_datas(sample: Sample, kind: str) -> None:
    shuffled = sample.frame[list(reversed(sample.frame.columns))]
    path = _csv(sample, shuffled, f"reversed-{kind}.csv")

    draft = _draft(sample, kind, path)

    assert draft.feature_names == sample.policy.feature_names


def test_without_declared_names_the_data_order_is_kept(sample: Sample) -> None:
    shuffled = sample.frame[list(reversed(sample.frame.columns))]
    path = _csv(sample, shuffled, "reversed-xgboost.csv")

    draft = _draft(sample, "xgboost", path)

    assert draft.feature_names == list(reversed(sample.policy.feature_names))


@pytest.mark.parametrize("kind", ["sklearn", "onnx"])
def test_data_lacking_a_declared_input_is_refused(sample: Sample, kind: str) -> None:
    path = _csv(sample, sample.frame.drop(columns=["education_num"]), f"lacking-{kind}.csv")

    with pytest.raises(ConfigError) as caught:
        _draft(sample, kind, path)
    message = caught.value.message
    assert "education_num" in message and "age" not in message


# The draft is a policy that wraps


@pytest.mark.parametrize("kind", KINDS)
def test_the_draft_validates_and_wraps_the_model_unchanged(
    sample: Sample, kind: str, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    name = f"gs_draft_{kind}"
    text = draft_policy_text(
        sample.models[kind], sample.data_file, name, ["income"], PROTECTED, trust=True
    )
    policy_file = sample.folder / f"policy-{kind}.yaml"
    policy_file.write_text(text, encoding="utf-8")

    policy = Policy.from_file(policy_file)
    result = wrap_file(sample.models[kind], policy_file, sample.data_file, master_key, trust=True)
    created.append(result.tag)

    assert text.startswith("# Draft policy for")
    assert policy == _draft(sample, kind)
    assert result.tag.startswith(f"gs_draft_{kind}:")
    assert result.manifest["explainer"]["method"] == EXPLAINER[kind]
    # The drafted encoding has the reference policy's columns, so the model sees
    # the same matrix it was trained on.
    assert TabularEncoder(policy).columns == TabularEncoder(sample.policy).columns


# Known bugs, kept visible until fixed


def test_a_column_name_that_cannot_be_a_feature_is_refused_as_config(sample: Sample) -> None:
    frame = sample.frame.rename(columns={"hours_per_week": "hours-per-week"})
    path = _csv(sample, frame, "hyphen.csv")

    with pytest.raises(ConfigError):
        _draft(sample, "xgboost", path)


def test_a_protected_column_with_one_group_is_refused_as_config(sample: Sample) -> None:
    frame = sample.frame.assign(sex="Male")
    path = _csv(sample, frame, "one-group.csv")

    with pytest.raises(ConfigError):
        _draft(sample, "xgboost", path)


class _Linear(torch.nn.Module):
    def __init__(self, columns: int) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.layer = torch.nn.Linear(columns, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x / 1000.0).squeeze(-1)


def test_a_drafted_bool_column_wraps_with_the_same_data(
    sample: Sample, master_key: vault.FileKeyProvider, created: list[str]
) -> None:
    frame = sample.frame.head(400).assign(over_40=sample.frame["age"].head(400) > 40)
    path = _csv(sample, frame, "bool.csv")
    draft = _draft(sample, "torchscript", path)
    assert draft.features[-1].categories == ["False", "True"]
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_Linear(TabularEncoder(draft).n_columns)), buffer)

    result = wrap_model(
        policy=draft,
        runtime="torchscript",
        model_bytes=buffer.getvalue(),
        train=pd.read_csv(path),
        provider=master_key,
    )
    created.append(result.tag)
