"""Stage 8, explain (trees): exact TreeSHAP per original feature, additive to the margin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import OneHotEncoder

from guarded_serving.encoding import TabularEncoder
from guarded_serving.explain.base import ExplainStage
from guarded_serving.explain.tree import TOLERANCE, XGBoostTreeExplainer, column_groups
from guarded_serving.guards.anomaly import AnomalyGuard, KNNAnomalyDetector
from guarded_serving.guards.schema import SchemaGuard
from guarded_serving.policy import CategoricalFeature, ExplanationPolicy, Policy
from guarded_serving.recipes import credit_risk
from guarded_serving.registry import LoadedModel
from guarded_serving.runtimes import load_runtime
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.runtimes.xgboost import XGBoostRuntime
from guarded_serving.types import ScoringRequest


@dataclass(frozen=True)
class Trained:
    """A small seeded model on the German credit data, with its train and test rows."""

    runtime: XGBoostRuntime
    encoder: TabularEncoder
    train: ModelInput
    test: ModelInput


@pytest.fixture(scope="module")
def trained(credit_policy: Policy) -> Trained:
    frame = credit_risk.load_german_credit()
    train, val, test = credit_risk.split(frame, credit_policy)
    booster = credit_risk.train(credit_policy, train, val, rounds=40)
    # As the recipe does: the server feeds unnamed matrices.
    booster.feature_names = None
    encoder = TabularEncoder(credit_policy)
    return Trained(
        XGBoostRuntime(booster),
        encoder,
        ModelInput(train.features.to_dict("records"), encoder),
        ModelInput(test.features.to_dict("records"), encoder),
    )


def test_attributions_add_up_to_the_margin_for_every_test_row(trained: Trained) -> None:
    runtime, encoder, inputs = trained.runtime, trained.encoder, trained.test

    explanations = XGBoostTreeExplainer(runtime, encoder).explain(inputs)
    margins = runtime.predict_margin(inputs.matrix)

    assert len(explanations) == len(inputs) == 200
    totals = np.array([e.base_value + sum(e.attributions.values()) for e in explanations])
    np.testing.assert_allclose(totals, margins, rtol=0, atol=1e-5)
    # Each explanation states how closely it adds up, and that bound holds.
    assert {e.tolerance for e in explanations} == {TOLERANCE}
    assert np.max(np.abs(totals - margins)) <= TOLERANCE
    assert {e.status for e in explanations} == {"ok"}
    # Attributions are not trivially zero: the model uses several features per row.
    assert np.mean([sum(v != 0 for v in e.attributions.values()) for e in explanations]) > 3


def test_attributions_are_per_original_feature_in_policy_order(
    trained: Trained, credit_policy: Policy
) -> None:
    first = ModelInput(trained.test.records[:5], trained.encoder)

    explanations = XGBoostTreeExplainer(trained.runtime, trained.encoder).explain(first)

    assert len(explanations) == 5
    for explanation in explanations:
        assert list(explanation.attributions) == credit_policy.feature_names
        assert len(explanation.attributions) == 18
        assert explanation.method == "tree_shap"
        assert explanation.output_space == "log_odds"
        assert all(isinstance(v, float) for v in explanation.attributions.values())
    # The base value is the same for every row: the expected margin.
    assert len({e.base_value for e in explanations}) == 1


def test_categorical_attribution_is_the_sum_of_its_one_hot_columns(trained: Trained) -> None:
    runtime, encoder = trained.runtime, trained.encoder
    first = ModelInput(trained.test.records[:20], encoder)

    contributions = runtime.contributions(first.matrix).astype(np.float64)
    explanations = XGBoostTreeExplainer(runtime, encoder).explain(first)

    purpose = encoder.feature_columns["purpose"]
    expected = contributions[:, purpose].sum(axis=1)
    np.testing.assert_allclose([e.attributions["purpose"] for e in explanations], expected)


def test_explainer_uses_a_matrix_given_with_the_input(trained: Trained) -> None:
    records = trained.test.records[:10]
    matrix = trained.encoder.encode(records)
    explainer = XGBoostTreeExplainer(trained.runtime, trained.encoder)

    encoded_here = explainer.explain(ModelInput(records, trained.encoder))
    given = explainer.explain(ModelInput(records, trained.encoder, matrix=matrix))
    # A different matrix for the same records: the explainer must follow the matrix.
    other = trained.encoder.encode(trained.test.records[10:20])
    swapped = explainer.explain(ModelInput(records, trained.encoder, matrix=other))

    assert [e.attributions for e in given] == [e.attributions for e in encoded_here]
    expected = trained.runtime.predict_margin(other)
    totals = [e.base_value + sum(e.attributions.values()) for e in swapped]
    np.testing.assert_allclose(totals, expected, rtol=0, atol=TOLERANCE)


def test_runtime_bytes_roundtrip_gives_identical_margins(trained: Trained) -> None:
    runtime, encoder, inputs = trained.runtime, trained.encoder, trained.test
    matrix = inputs.matrix

    data = runtime.to_bytes()
    copy = XGBoostRuntime.from_bytes(data)
    by_kind = load_runtime("xgboost", data, encoder)

    assert isinstance(data, bytes)
    assert isinstance(by_kind, XGBoostRuntime)
    assert runtime.output_space == by_kind.output_space == "margin"
    assert by_kind.n_features == encoder.n_columns
    np.testing.assert_array_equal(copy.predict_margin(matrix), runtime.predict_margin(matrix))
    np.testing.assert_array_equal(by_kind.predict_margin(matrix), runtime.predict_margin(matrix))
    np.testing.assert_array_equal(copy.contributions(matrix), runtime.contributions(matrix))
    assert copy.predict_margin(matrix).dtype == np.float64
    # The generic entry point scores the input's one-hot matrix, in the margin space.
    np.testing.assert_array_equal(by_kind.predict_score(inputs), runtime.predict_margin(matrix))
    assert by_kind.predict_score(inputs).shape == (len(inputs),)


def _loaded(trained: Trained, policy: Policy) -> LoadedModel:
    """A model as the registry holds it, from the fixture's runtime and real guards."""
    detector = KNNAnomalyDetector(neighbours=5).fit(
        trained.train.matrix, trained.encoder.numeric_mask
    )
    detector.calibrate(trained.test.matrix, 0.05)
    return LoadedModel(
        name=policy.model,
        version="test",
        policy=policy,
        runtime=trained.runtime,
        encoder=trained.encoder,
        schema=SchemaGuard(policy, trained.encoder),
        anomaly=AnomalyGuard(detector, policy.guards.anomaly),
        explainer=XGBoostTreeExplainer(trained.runtime, trained.encoder),
        manifest={},
    )


def _validated(model: LoadedModel, records: list[dict[str, Any]], explain: bool):
    request = ScoringRequest("req-1", model, None, records, raw_explain=explain)
    model.schema(request)
    return request


def test_explain_stage_respects_the_requests_explain_switch(
    trained: Trained, credit_policy: Policy
) -> None:
    model = _loaded(trained, credit_policy)
    records = trained.test.records[:3]
    quiet, verbose = _validated(model, records, False), _validated(model, records, True)

    stage = ExplainStage()
    stage(quiet)
    stage(verbose)

    assert stage.name == "explain"
    assert quiet.explanations is None
    assert verbose.explanations is not None and len(verbose.explanations) == 3
    margins = trained.runtime.predict_score(verbose.inputs)
    totals = [e.base_value + sum(e.attributions.values()) for e in verbose.explanations]
    np.testing.assert_allclose(totals, margins, rtol=0, atol=TOLERANCE)


def test_explain_stage_does_nothing_when_the_policy_disables_explanations(
    trained: Trained, credit_policy: Policy
) -> None:
    policy = credit_policy.model_copy(update={"explanation": ExplanationPolicy(enabled=False)})
    model = _loaded(trained, policy)
    request = _validated(model, trained.test.records[:3], True)

    ExplainStage()(request)

    assert request.explain is True
    assert request.explanations is None


def _credit_column_transformer(policy: Policy, sample: ModelInput) -> ColumnTransformer:
    """One-hot for the categories (first), the numbers passed through (after)."""
    categorical = [f for f in policy.features if isinstance(f, CategoricalFeature)]
    numeric = [f.name for f in policy.features if not isinstance(f, CategoricalFeature)]
    transformer = ColumnTransformer(
        [
            (
                "categories",
                OneHotEncoder(categories=[f.categories for f in categorical], sparse_output=False),
                [f.name for f in categorical],
            ),
            ("numbers", "passthrough", numeric),
        ]
    )
    return transformer.fit(sample.frame)


def test_column_groups_follow_the_one_hot_blocks_of_a_column_transformer(
    trained: Trained, credit_policy: Policy
) -> None:
    transformer = _credit_column_transformer(credit_policy, trained.train)
    categorical = [f for f in credit_policy.features if isinstance(f, CategoricalFeature)]

    groups = column_groups(transformer.transform, trained.encoder, trained.test)

    # Expected layout: every category's one-hot block in order, then each number.
    expected: dict[str, list[int]] = {}
    start = 0
    for feature in categorical:
        expected[feature.name] = list(range(start, start + len(feature.categories)))
        start += len(feature.categories)
    for feature in credit_policy.features:
        if not isinstance(feature, CategoricalFeature):
            expected[feature.name] = [start]
            start += 1
    assert start == transformer.transform(trained.test.frame.head(1)).shape[1]
    assert groups == [expected[name] for name in credit_policy.feature_names]


def test_column_groups_refuse_a_column_two_features_drive(
    trained: Trained, credit_policy: Policy
) -> None:
    transformer = _credit_column_transformer(credit_policy, trained.train)

    def mixed(frame: Any) -> np.ndarray:
        both = frame["duration_months"].to_numpy() + frame["credit_amount"].to_numpy()
        return np.column_stack([transformer.transform(frame), both])

    with pytest.raises(ValueError, match="more than one input feature"):
        column_groups(mixed, trained.encoder, trained.test)


def test_column_groups_refuse_a_column_no_feature_drives(
    trained: Trained, credit_policy: Policy
) -> None:
    transformer = _credit_column_transformer(credit_policy, trained.train)

    def with_constant(frame: Any) -> np.ndarray:
        out = transformer.transform(frame)
        return np.column_stack([out, np.ones(len(frame))])

    with pytest.raises(ValueError, match="no input feature"):
        column_groups(with_constant, trained.encoder, trained.test)
