"""Stage 8, explain (any model): budgeted KernelSHAP over feature codes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from guarded_serving.encoding import TabularEncoder
from guarded_serving.explain.base import describe_background
from guarded_serving.explain.kernel import METHOD, TOLERANCE, KernelShapExplainer
from guarded_serving.policy import CategoricalFeature, KernelShapPolicy, Policy
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.runtimes.sklearn import SklearnRuntime
from tests import adult_models

BUDGET = KernelShapPolicy(samples=256, background_rows=16, time_budget_ms=60_000)


@dataclass(frozen=True)
class Fitted:
    """A logistic-regression pipeline on the Adult sample, with background and rows to explain."""

    policy: Policy
    encoder: TabularEncoder
    runtime: SklearnRuntime
    background: np.ndarray
    rows: ModelInput


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    policy, train, test = adult_models.load()
    encoder = TabularEncoder(policy)
    train = train.head(600)
    estimator = Pipeline(
        [("scale", StandardScaler()), ("logit", LogisticRegression(max_iter=500))]
    )
    pipeline = adult_models.sklearn_pipeline(policy, estimator)
    pipeline.fit(train[policy.feature_names], train["income"])
    background = encoder.to_codes(adult_models.records(train.head(BUDGET.background_rows), policy))
    rows = ModelInput(adult_models.records(test.head(5), policy), encoder)
    return Fitted(policy, encoder, SklearnRuntime(pipeline, encoder), background, rows)


class _RecordingExplainer(KernelShapExplainer):
    """Keeps every block of feature codes shap asks the model to score."""

    def __init__(self, *args, **kwargs) -> None:
        self.seen: list[np.ndarray] = []
        super().__init__(*args, **kwargs)

    def _score(self, codes: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(codes, dtype=np.float64, copy=True))
        return super()._score(codes)


class _MarginRuntime:
    """Any runtime scoring in margins: a fixed linear function of the one-hot matrix."""

    kind = "stub"
    output_space = "margin"

    def __init__(self, encoder: TabularEncoder) -> None:
        self.weights = np.random.default_rng(3).normal(size=encoder.n_columns) / 100.0

    def predict_score(self, inputs: ModelInput) -> np.ndarray:
        return inputs.matrix.astype(np.float64) @ self.weights


def test_base_value_plus_attributions_equals_the_score_for_every_row(fitted: Fitted) -> None:
    np.random.seed(0)  # shap samples coalitions from numpy's global generator
    explainer = KernelShapExplainer(fitted.runtime, fitted.encoder, fitted.background, BUDGET)

    explanations = explainer.explain(fitted.rows)

    scores = fitted.runtime.predict_score(fitted.rows)
    assert len(explanations) == len(fitted.rows) == 5
    for explanation, score in zip(explanations, scores, strict=True):
        assert explanation.status == "ok"
        assert explanation.method == METHOD
        assert list(explanation.attributions) == fitted.policy.feature_names
        total = explanation.base_value + sum(explanation.attributions.values())
        assert abs(total - score) <= TOLERANCE
        assert explanation.tolerance == TOLERANCE
        assert explanation.details == {
            "samples": BUDGET.samples,
            "background": describe_background(fitted.background),
            "time_budget_ms": BUDGET.time_budget_ms,
        }
        assert explanation.details["background"]["rows"] == BUDGET.background_rows
    # The base value is the mean score over the background rows.
    background = ModelInput(fitted.encoder.from_codes(fitted.background), fitted.encoder)
    mean = float(np.mean(fitted.runtime.predict_score(background)))
    assert explanations[0].base_value == pytest.approx(mean, abs=1e-12)
    # The explanations carry information: several features move each row's score.
    assert all(sum(abs(v) > 1e-6 for v in e.attributions.values()) > 2 for e in explanations)


def test_output_space_follows_the_runtime(fitted: Fitted) -> None:
    probability = KernelShapExplainer(fitted.runtime, fitted.encoder, fitted.background, BUDGET)
    margin_runtime = _MarginRuntime(fitted.encoder)
    margin = KernelShapExplainer(margin_runtime, fitted.encoder, fitted.background, BUDGET)

    first = ModelInput(fitted.rows.records[:1], fitted.encoder)
    (in_probability,) = probability.explain(first)
    (in_log_odds,) = margin.explain(first)

    assert probability.output_space == in_probability.output_space == "probability"
    assert margin.output_space == in_log_odds.output_space == "log_odds"
    # A margin explanation adds up to the margin, not to a probability.
    total = in_log_odds.base_value + sum(in_log_odds.attributions.values())
    assert abs(total - margin_runtime.predict_score(first)[0]) <= TOLERANCE


def test_a_spent_time_budget_skips_later_rows_without_failing(fitted: Fitted) -> None:
    tiny = KernelShapPolicy(samples=256, background_rows=16, time_budget_ms=1)
    explainer = KernelShapExplainer(fitted.runtime, fitted.encoder, fitted.background, tiny)

    explanations = explainer.explain(fitted.rows)

    statuses = [e.status for e in explanations]
    assert len(statuses) == len(fitted.rows)
    assert set(statuses) <= {"ok", "skipped_time_budget"}
    # Once the budget is spent, every remaining row is skipped; one row alone takes
    # far more than a millisecond, so the last rows always are.
    first_skipped = statuses.index("skipped_time_budget")
    assert statuses[first_skipped:] == ["skipped_time_budget"] * (len(statuses) - first_skipped)
    assert first_skipped <= 1
    for explanation in explanations[first_skipped:]:
        assert explanation.attributions == {}
        assert explanation.method == METHOD
        assert explanation.output_space == "probability"
        assert explanation.details["time_budget_ms"] == 1
        assert np.isfinite(explanation.base_value)


def test_no_row_is_explained_past_the_request_deadline(fitted: Fitted) -> None:
    explainer = KernelShapExplainer(fitted.runtime, fitted.encoder, fitted.background, BUDGET)

    late = explainer.explain(fitted.rows, deadline_s=time.monotonic() - 1.0)

    assert {e.status for e in late} == {"skipped_time_budget"}


def test_missing_features_are_filled_with_whole_background_values(fitted: Fitted) -> None:
    np.random.seed(1)
    explainer = _RecordingExplainer(fitted.runtime, fitted.encoder, fitted.background, BUDGET)
    row = ModelInput(fitted.rows.records[:1], fitted.encoder)

    explainer.explain(row)

    seen = np.vstack(explainer.seen[1:])  # the first call scored the background alone
    assert len(seen) >= BUDGET.samples
    # Codes survive the round trip exactly: each category is a whole index.
    np.testing.assert_array_equal(fitted.encoder.to_codes(fitted.encoder.from_codes(seen)), seen)
    own = fitted.encoder.to_codes(row.records)[0]
    for j, feature in enumerate(fitted.policy.features):
        allowed = {own[j], *fitted.background[:, j]}
        assert set(np.unique(seen[:, j])) <= allowed, feature.name
        if isinstance(feature, CategoricalFeature):
            assert np.all(seen[:, j] == np.round(seen[:, j]))
            assert np.all((seen[:, j] >= 0) & (seen[:, j] < len(feature.categories)))
    # Every category the model was asked about is one of the policy's.
    for record in fitted.encoder.from_codes(seen):
        for feature in fitted.policy.features:
            if isinstance(feature, CategoricalFeature):
                assert record[feature.name] in feature.categories
