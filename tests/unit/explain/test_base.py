"""Stage 8, explain: a failing explainer never fails the prediction, and is counted."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from guarded_serving.explain.base import FAILED, ExplainStage
from guarded_serving.server import _explanation_body
from guarded_serving.types import Explanation, ScoringRequest


class _Broken:
    method = "integrated_gradients"

    def explain(self, inputs, deadline_s=None):
        raise RuntimeError("secret detail that must stay in the log")


class _Fine:
    method = "tree_shap"

    def explain(self, inputs, deadline_s=None):
        return [Explanation(method=self.method, base_value=0.5, attributions={"a": 1.0})] * len(
            inputs
        )


def _request(explainer) -> ScoringRequest:
    model = SimpleNamespace(
        name="m",
        explainer=explainer,
        policy=SimpleNamespace(explanation=SimpleNamespace(enabled=True)),
    )
    request = ScoringRequest("req-1", model, None, [{}, {}, {}])  # type: ignore[arg-type]
    request.inputs = [{}, {}, {}]  # type: ignore[assignment]
    return request


@pytest.fixture
def counted():
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    counter = meter.create_counter("guarded_serving.explanations")

    def points() -> dict[tuple[str, str], int]:
        data = reader.get_metrics_data()
        found = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attrs = dict(point.attributes)
                        found[attrs["model"], attrs["status"]] = point.value
        return found

    return counter, points


def test_a_failing_explainer_answers_failed_rows_and_warns(counted, caplog):
    counter, points = counted
    request = _request(_Broken())

    with caplog.at_level(logging.WARNING, logger="guarded_serving.explain.base"):
        ExplainStage(counter)(request)

    assert [e.status for e in request.explanations] == [FAILED] * 3
    assert _explanation_body(request.explanations[0], 0.3, "margin") == {
        "method": "integrated_gradients",
        "status": FAILED,
    }
    assert points() == {("m", FAILED): 3}
    [record] = caplog.records
    assert "RuntimeError" in record.getMessage()
    assert "secret detail" not in record.getMessage()


def test_explained_rows_are_counted_by_status(counted):
    counter, points = counted
    request = _request(_Fine())

    ExplainStage(counter)(request)

    assert [e.status for e in request.explanations] == ["ok"] * 3
    assert points() == {("m", "ok"): 3}
