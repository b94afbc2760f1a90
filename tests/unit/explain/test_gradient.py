"""Stage 8, explain (torch models): integrated gradients from a fixed background set."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from guarded_serving.encoding import TabularEncoder
from guarded_serving.explain.gradient import METHOD, IntegratedGradientsExplainer
from guarded_serving.policy import GradientPolicy, Policy
from guarded_serving.runtimes.base import ModelInput
from tests import adult_models

TOLERANCE = 0.01


@dataclass(frozen=True)
class Data:
    """The Adult policy's encoder, training and background matrices, rows to explain."""

    policy: Policy
    encoder: TabularEncoder
    train: np.ndarray
    background: np.ndarray
    rows: ModelInput


@pytest.fixture(scope="module")
def data() -> Data:
    policy, train, test = adult_models.load()
    encoder = TabularEncoder(policy)
    matrix = encoder.encode(adult_models.records(train, policy))
    rows = ModelInput(adult_models.records(test.head(8), policy), encoder)
    return Data(policy, encoder, matrix, matrix[:16], rows)


class _MLP(torch.nn.Module):
    """A seeded, untrained tanh network over the one-hot matrix, standardized as
    the training rows are."""

    def __init__(self, matrix: np.ndarray, seed: int, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        x = torch.from_numpy(matrix)
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp_min(1e-3))
        self.body = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        with torch.no_grad():
            self.body[0].weight.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std).squeeze(-1)


def _explainer(forward, data: Data, steps: int) -> IntegratedGradientsExplainer:
    return IntegratedGradientsExplainer(
        forward, data.encoder, data.background, GradientPolicy(steps=steps), TOLERANCE
    )


def _logits(forward, matrix: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return forward(torch.from_numpy(matrix)).double().numpy()


def test_completeness_gap_is_within_tolerance_and_reported(data: Data) -> None:
    net = _MLP(data.train, seed=0)
    explainer = _explainer(net, data, steps=64)

    explanations = explainer.explain(data.rows)

    logits = _logits(net, data.rows.matrix)
    base = float(_logits(net, data.background).mean())
    assert len(explanations) == len(data.rows)
    for explanation, logit in zip(explanations, logits, strict=True):
        assert explanation.method == METHOD
        assert explanation.status == "ok"
        assert explanation.output_space == "log_odds"
        assert explanation.tolerance == TOLERANCE
        assert explanation.base_value == pytest.approx(base, abs=1e-6)
        assert list(explanation.attributions) == data.policy.feature_names
        gap = logit - explanation.base_value - sum(explanation.attributions.values())
        assert explanation.details["completeness_gap"] == pytest.approx(gap, abs=1e-9)
        assert abs(explanation.details["completeness_gap"]) <= TOLERANCE
        assert explanation.details["steps"] == 64
        assert explanation.details["background"]["rows"] == len(data.background)


def test_a_linear_model_gets_exact_attributions_folded_per_feature(data: Data) -> None:
    rng = np.random.default_rng(5)
    scale = data.train.std(axis=0).clip(min=1e-3)
    weights = (rng.normal(size=data.encoder.n_columns) / scale).astype(np.float32)
    w, bias = torch.from_numpy(weights), torch.tensor(0.25)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return x @ w + bias

    # Few steps suffice: the gradient of a linear model is the same everywhere.
    explanations = _explainer(linear, data, steps=4).explain(data.rows)

    x = data.rows.matrix.astype(np.float64)
    per_column = weights.astype(np.float64) * (x - data.background.astype(np.float64).mean(0))
    expected = data.encoder.fold(per_column)
    got = np.array([list(e.attributions.values()) for e in explanations])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # Categorical blocks are summed: workclass gets its whole one-hot block's share.
    block = data.encoder.feature_columns["workclass"]
    j = data.policy.feature_names.index("workclass")
    np.testing.assert_allclose(got[:, j], per_column[:, block].sum(axis=1), atol=1e-4)
    gaps = [abs(e.details["completeness_gap"]) for e in explanations]
    assert max(gaps) <= 1e-3


def test_more_steps_shrink_the_gap_on_a_nonlinear_model(data: Data) -> None:
    net = _MLP(data.train, seed=2, gain=3.0)

    gaps = {}
    for steps in (4, 16, 64):
        explanations = _explainer(net, data, steps=steps).explain(data.rows)
        gaps[steps] = float(np.mean([abs(e.details["completeness_gap"]) for e in explanations]))

    assert gaps[4] > gaps[16] > gaps[64]
    # The midpoint rule's error falls roughly with the square of the step count.
    assert gaps[64] < gaps[4] / 10
    assert gaps[64] <= TOLERANCE


def test_rows_past_the_time_budget_are_answered_without_attributions(data: Data) -> None:
    net = _MLP(data.train, seed=0)
    calls = 0

    def slow(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if x.requires_grad:
            time.sleep(0.02)  # each explained row outlasts the whole budget
        return net(x)

    explainer = IntegratedGradientsExplainer(
        slow, data.encoder, data.background, GradientPolicy(steps=8, time_budget_ms=5), TOLERANCE
    )

    explanations = explainer.explain(data.rows)

    assert [e.status for e in explanations] == ["ok"] + ["skipped_time_budget"] * 7
    assert explanations[-1].attributions == {}
    assert explanations[-1].details["time_budget_ms"] == 5
    # Rows past the budget cost nothing: one batched forward pass, one explained row.
    assert calls == 3  # the background's base value, the logits, the one row


def test_no_row_is_explained_past_the_request_deadline(data: Data) -> None:
    net = _MLP(data.train, seed=0)
    explainer = _explainer(net, data, steps=8)

    late = explainer.explain(data.rows, deadline_s=time.monotonic() - 1.0)
    in_time = explainer.explain(data.rows, deadline_s=time.monotonic() + 60.0)

    assert {e.status for e in late} == {"skipped_time_budget"}
    assert {e.status for e in in_time} == {"ok"}
