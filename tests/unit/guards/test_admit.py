"""Stage 2, admit: per-client, per-model row budgets in memory storage."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from guarded_serving.errors import InvalidInput, RateLimited
from guarded_serving.guards.admit import AdmitStage
from guarded_serving.policy import Policy
from guarded_serving.types import Outcome, ScoringRequest


def _policy(rows_per_window: int = 10, window_s: int = 60, max_batch_rows: int = 6) -> Policy:
    return Policy.model_validate(
        {
            "model": "toy",
            "features": [{"name": "x", "type": "float", "min": 0, "max": 1}],
            "output": {"positive_label": "yes", "negative_label": "no"},
            "limits": {
                "rows_per_window": rows_per_window,
                "window_s": window_s,
                "max_batch_rows": max_batch_rows,
            },
        }
    )


def _model(policy: Policy, name: str = "toy") -> SimpleNamespace:
    """The part of a loaded model the admit stage reads."""
    return SimpleNamespace(name=name, policy=policy)


def _request(
    model: SimpleNamespace, rows: int, client_id: str = "bank-a", budget: int | None = None
) -> ScoringRequest:
    return ScoringRequest(
        request_id="req-1",
        model=model,  # type: ignore[arg-type]
        api_key=None,
        raw_records=[{"x": 0.5}] * rows,
        client_id=client_id,
        client_rows_per_window=budget,
    )


def _admit(stage: AdmitStage, request: ScoringRequest) -> None:
    stage(request)
    assert [(v.stage, v.outcome) for v in request.verdicts] == [("admit", Outcome.PASS)]


def test_rows_within_the_policy_budget_are_admitted_then_refused() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=10, window_s=60))
    for rows in (4, 4, 2):
        _admit(stage, _request(model, rows))
    request = _request(model, 1)

    with pytest.raises(RateLimited) as caught:
        stage(request)

    error = caught.value
    assert (error.code, error.status_code) == ("rate_limited", 429)
    assert 1 <= error.retry_after_s <= 60
    assert error.headers() == {"Retry-After": str(error.retry_after_s)}
    assert [(v.outcome, v.code) for v in request.verdicts] == [(Outcome.REJECT, "rate_limited")]


def test_a_batch_that_does_not_fit_the_rest_of_the_budget_is_refused_whole() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=10))
    _admit(stage, _request(model, 6))

    with pytest.raises(RateLimited):
        stage(_request(model, 5))
    # The refused batch was not charged: the 4 rows left still fit.
    _admit(stage, _request(model, 4))


def test_the_clients_own_budget_replaces_the_policys() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=10))
    _admit(stage, _request(model, 3, budget=3))

    with pytest.raises(RateLimited):
        stage(_request(model, 1, budget=3))


def test_a_larger_client_budget_is_honoured() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=2, max_batch_rows=6))
    for _ in range(3):
        _admit(stage, _request(model, 6, budget=20))

    with pytest.raises(RateLimited):
        stage(_request(model, 6, budget=20))


def test_clients_have_separate_budgets() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=5, max_batch_rows=5))
    _admit(stage, _request(model, 5, client_id="bank-a"))
    with pytest.raises(RateLimited):
        stage(_request(model, 1, client_id="bank-a"))

    _admit(stage, _request(model, 5, client_id="bank-b"))
    _admit(stage, _request(model, 5, client_id="anonymous"))


def test_models_have_separate_budgets() -> None:
    stage, policy = AdmitStage(), _policy(rows_per_window=5, max_batch_rows=5)
    _admit(stage, _request(_model(policy, "toy"), 5))
    with pytest.raises(RateLimited):
        stage(_request(_model(policy, "toy"), 1))

    _admit(stage, _request(_model(policy, "other"), 5))


def test_stages_do_not_share_memory_storage() -> None:
    model = _model(_policy(rows_per_window=5, max_batch_rows=5))
    _admit(AdmitStage(), _request(model, 5))

    _admit(AdmitStage("memory://"), _request(model, 5))


def test_batch_over_the_policy_maximum_is_invalid_input() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=100, max_batch_rows=6))
    request = _request(model, 7)

    with pytest.raises(InvalidInput) as caught:
        stage(request)

    error = caught.value
    assert (error.code, error.field, error.status_code) == ("batch_too_large", "records", 422)
    assert [(v.outcome, v.code) for v in request.verdicts] == [(Outcome.REJECT, "batch_too_large")]
    # A refused batch costs nothing.
    _admit(stage, _request(model, 6))


def test_a_non_list_body_costs_one_row() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=1))
    request = _request(model, 0)
    request.raw_records = {"x": 0.5}
    _admit(stage, request)

    with pytest.raises(RateLimited):
        stage(_request(model, 1))


def test_the_budget_comes_back_when_the_window_moves_on() -> None:
    stage, model = AdmitStage(), _model(_policy(rows_per_window=3, window_s=1, max_batch_rows=3))
    _admit(stage, _request(model, 3))
    with pytest.raises(RateLimited) as caught:
        stage(_request(model, 1))
    assert caught.value.retry_after_s == 1

    time.sleep(1.05)

    _admit(stage, _request(model, 3))
