"""The credit-risk recipe: real data, a deterministic split, a model in the expected range."""

from __future__ import annotations

import json
from typing import Any

import bentoml
import numpy as np
import pandas as pd
import pytest

from guarded_serving.encoding import TabularEncoder
from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk
from guarded_serving.runtimes.xgboost import XGBoostRuntime
from guarded_serving.wrap import ARTIFACT_FILE, MANIFEST_FILE, POLICY_FILE


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return credit_risk.load_german_credit()


@pytest.fixture(scope="module")
def manifest(credit_run: Any) -> dict[str, Any]:
    stored = bentoml.models.get(credit_run.tag)
    with open(stored.path_of(MANIFEST_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def test_data_loads_with_derived_target_and_context(frame: pd.DataFrame) -> None:
    assert len(frame) == 1000
    assert frame["good"].sum() == 700
    assert set(frame["sex"]) == {"female", "male"}
    assert set(frame["age_band"]) == {"under_25", "25_and_over"}
    assert (frame["age_band"] == "under_25").sum() == (frame["age_years"] < 25).sum()


def test_every_row_of_the_data_satisfies_the_policy(
    frame: pd.DataFrame, credit_policy: Policy
) -> None:
    for feature in credit_policy.features:
        column = frame[feature.name]
        if feature.type == "category":
            assert set(column) <= set(feature.categories), feature.name
        else:
            assert column.between(feature.min, feature.max).all(), feature.name


def test_split_is_deterministic_stratified_and_disjoint(
    frame: pd.DataFrame, credit_policy: Policy
) -> None:
    first = credit_risk.split(frame, credit_policy)
    second = credit_risk.split(frame.copy(), credit_policy)

    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a.features, b.features)
        pd.testing.assert_frame_equal(a.context, b.context)
        np.testing.assert_array_equal(a.target, b.target)
    train, _, test = first
    assert [len(s.target) for s in first] == [600, 200, 200]
    assert [int(s.target.sum()) for s in first] == [420, 140, 140]
    assert list(train.features.columns) == credit_policy.feature_names
    assert list(train.context.columns) == ["sex", "age_band"]
    # Together the three parts are the whole data set, each row once.
    rows = pd.concat([s.features for s in first]).sort_values(credit_policy.feature_names)
    whole = frame[credit_policy.feature_names].sort_values(credit_policy.feature_names)
    pd.testing.assert_frame_equal(rows.reset_index(drop=True), whole.reset_index(drop=True))
    assert len(test.features) == len(test.context) == len(test.target)


def test_training_is_deterministic(frame: pd.DataFrame, credit_policy: Policy) -> None:
    train, val, test = credit_risk.split(frame, credit_policy)
    matrix = TabularEncoder(credit_policy).encode(test.features.to_dict("records"))
    margins = []
    for _ in range(2):
        booster = credit_risk.train(credit_policy, train, val, rounds=10)
        booster.feature_names = None
        margins.append(XGBoostRuntime(booster).predict_margin(matrix))

    np.testing.assert_array_equal(margins[0], margins[1])


def test_recipe_registers_a_model_with_test_auc_in_the_expected_range(
    credit_run: Any, manifest: dict[str, Any]
) -> None:
    figures = manifest["figures"]

    assert credit_run.tag.startswith("credit_risk:")
    assert 0.72 <= figures["test_roc_auc"] <= 0.85
    assert 0.65 <= figures["test_accuracy"] <= 0.85
    assert figures["rows"] == {"train": 600, "validation": 200, "test": 200}
    assert 1 <= figures["trees"] <= 600


def test_recipe_manifest_records_the_calibrated_anomaly_guard(
    credit_run: Any, manifest: dict[str, Any]
) -> None:
    anomaly = manifest["calibration"]["anomaly"]

    assert manifest["name"] == "credit_risk"
    assert manifest["runtime"] == "xgboost"
    assert manifest["key_id"] == credit_run.provider.key_id
    assert anomaly["calibration_rows"] == 200
    assert anomaly["reference_rows"] == 600
    assert anomaly["target_fpr"] == 0.01
    assert anomaly["calibration_fpr"] <= 0.01
    assert 0.0 <= anomaly["holdout_flag_rate"] <= 0.05


def test_recipe_manifest_records_the_runtime_and_the_explainer(
    manifest: dict[str, Any],
) -> None:
    assert manifest["format"] == 1
    assert manifest["output_space"] == "margin"
    assert manifest["runtime_options"] == {}
    # xgboost gets its own exact TreeSHAP, with nothing to fall back from.
    assert manifest["explainer"] == {
        "method": "tree_shap",
        "options": {"engine": "xgboost"},
        "notes": [],
    }
    # The recipe's own splits are used as given: training and validation rows.
    assert manifest["data"] == {"train_rows": 600, "calibration_rows": 200}


def test_recipe_stores_only_ciphertext_of_the_model(credit_run: Any) -> None:
    stored = bentoml.models.get(credit_run.tag)
    with open(stored.path_of(ARTIFACT_FILE), "rb") as fh:
        sealed = fh.read()

    assert sealed.startswith(b"GSENV1\n")
    # A UBJSON booster would carry its learner section in clear text.
    assert b"learner" not in sealed
    assert b"gbtree" not in sealed
    assert Policy.from_file(stored.path_of(POLICY_FILE)).model == "credit_risk"


def test_recipe_reports_through_echo(credit_run: Any) -> None:
    text = "\n".join(credit_run.echoed)

    assert text.startswith("credit_risk: 600 train / 200 validation / 200 test rows")
    assert "test ROC AUC 0." in text
    assert f"registered {credit_run.tag}" in text
    assert credit_run.provider.key_id in text
