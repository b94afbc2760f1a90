"""Stage 8, explain (trees): exact TreeSHAP per original feature, additive to the margin."""

from __future__ import annotations

import numpy as np
import pytest

from guarded_serving.encoding import TabularEncoder
from guarded_serving.explain.tree import TreeExplainer
from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk
from guarded_serving.runtimes import load_runtime
from guarded_serving.runtimes.xgboost import XGBoostRuntime
from guarded_serving.types import ScoringRequest


@pytest.fixture(scope="module")
def trained(credit_policy: Policy) -> tuple[XGBoostRuntime, TabularEncoder, np.ndarray]:
    """A small seeded model on the German credit data, and the encoded test rows."""
    frame = credit_risk.load_german_credit()
    train, val, test = credit_risk.split(frame, credit_policy)
    booster = credit_risk.train(credit_policy, train, val, rounds=40)
    # As the recipe does: the server feeds unnamed matrices.
    booster.feature_names = None
    encoder = TabularEncoder(credit_policy)
    matrix = encoder.encode(test.features.to_dict("records"))
    return XGBoostRuntime(booster), encoder, matrix


def test_attributions_add_up_to_the_margin_for_every_test_row(
    trained: tuple[XGBoostRuntime, TabularEncoder, np.ndarray],
) -> None:
    runtime, encoder, matrix = trained

    explanations = TreeExplainer(runtime, encoder).explain(matrix)
    margins = runtime.predict_margin(matrix)

    assert len(explanations) == matrix.shape[0] == 200
    totals = np.array([e.base_value + sum(e.attributions.values()) for e in explanations])
    np.testing.assert_allclose(totals, margins, rtol=0, atol=1e-5)
    # Attributions are not trivially zero: the model uses several features per row.
    assert np.mean([sum(v != 0 for v in e.attributions.values()) for e in explanations]) > 3


def test_attributions_are_per_original_feature_in_policy_order(
    trained: tuple[XGBoostRuntime, TabularEncoder, np.ndarray], credit_policy: Policy
) -> None:
    runtime, encoder, matrix = trained

    explanations = TreeExplainer(runtime, encoder).explain(matrix[:5])

    for explanation in explanations:
        assert list(explanation.attributions) == credit_policy.feature_names
        assert len(explanation.attributions) == 18
        assert explanation.method == "tree_shap"
        assert explanation.output_space == "log_odds"
        assert all(isinstance(v, float) for v in explanation.attributions.values())
    # The base value is the same for every row: the expected margin.
    assert len({e.base_value for e in explanations}) == 1


def test_categorical_attribution_is_the_sum_of_its_one_hot_columns(
    trained: tuple[XGBoostRuntime, TabularEncoder, np.ndarray],
) -> None:
    runtime, encoder, matrix = trained

    contributions = runtime.contributions(matrix[:20]).astype(np.float64)
    explanations = TreeExplainer(runtime, encoder).explain(matrix[:20])

    purpose = encoder.feature_columns["purpose"]
    expected = contributions[:, purpose].sum(axis=1)
    np.testing.assert_allclose([e.attributions["purpose"] for e in explanations], expected)


def test_runtime_bytes_roundtrip_gives_identical_margins(
    trained: tuple[XGBoostRuntime, TabularEncoder, np.ndarray],
) -> None:
    runtime, _, matrix = trained

    data = runtime.to_bytes()
    copy = XGBoostRuntime.from_bytes(data)
    by_kind = load_runtime("xgboost", data)

    assert isinstance(data, bytes)
    np.testing.assert_array_equal(copy.predict_margin(matrix), runtime.predict_margin(matrix))
    np.testing.assert_array_equal(by_kind.predict_margin(matrix), runtime.predict_margin(matrix))
    np.testing.assert_array_equal(copy.contributions(matrix), runtime.contributions(matrix))
    assert copy.predict_margin(matrix).dtype == np.float64


def test_explainer_stage_respects_the_requests_explain_switch(
    trained: tuple[XGBoostRuntime, TabularEncoder, np.ndarray],
) -> None:
    runtime, encoder, matrix = trained
    explainer = TreeExplainer(runtime, encoder)

    def request(explain: bool) -> ScoringRequest:
        r = ScoringRequest("req-1", None, None, [{}] * 3)  # type: ignore[arg-type]
        r.matrix, r.explain = matrix[:3], explain
        return r

    quiet, verbose = request(False), request(True)
    explainer(quiet)
    explainer(verbose)

    assert quiet.explanations is None
    assert verbose.explanations is not None and len(verbose.explanations) == 3
