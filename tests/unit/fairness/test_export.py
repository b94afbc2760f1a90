"""OpenTelemetry export of fairness counts and figures, read back in memory."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Sum

from guarded_serving.fairness import (
    FairnessAccumulator,
    FairnessExporter,
    FairnessStore,
    LabelEvent,
    PredictionEvent,
)
from guarded_serving.policy import Policy

MODEL = "credit_risk"
PREFIX = "guarded_serving.fairness"

POLICY = Policy.model_validate(
    {
        "model": MODEL,
        "features": [{"name": "amount", "type": "float", "min": 0, "max": 1}],
        "protected_attributes": [
            {"name": "sex", "groups": ["female", "male"]},
            {"name": "age_band", "groups": ["<25", "25-60"]},
        ],
        "output": {"positive_label": "good", "negative_label": "bad"},
        "fairness": {"min_group_size": 10},
    }
)


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.meter = provider.get_meter("guarded_serving")  # type: ignore[attr-defined]
    yield reader
    provider.shutdown()


@pytest.fixture
def accumulator() -> Iterator[FairnessAccumulator]:
    store = FairnessStore(":memory:")
    with FairnessAccumulator(store) as acc:
        yield acc
    store.close()


def fill(acc: FairnessAccumulator, start: int = 0) -> None:
    """Records 40 predictions over both attributes and labels half of them."""
    for i in range(start, start + 40):
        sex = "female" if i % 2 else "male"
        age_band = "<25" if i < 8 else "25-60"
        predicted = int(i % 3 != 0) if sex == "female" else int(i % 5 == 0)
        acc.record(
            PredictionEvent(
                model=MODEL,
                version="1",
                request_id=f"req-{i}",
                timestamp_s=100.0,
                record_ids=(f"r{i}",),
                predicted=(predicted,),
                groups=({"sex": sex, "age_band": age_band},),
            )
        )
    acc.feedback([LabelEvent(f"r{i}", int(i % 4 != 0)) for i in range(start, start + 40, 2)])


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Metric name -> (data, {frozenset(attributes): value})."""
    out = {}
    data = reader.get_metrics_data()
    if data is None:
        return out
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = {
                    frozenset(p.attributes.items()): p.value for p in metric.data.data_points
                }
                out[metric.name] = (metric, points)
    return out


def key(**attributes: str) -> frozenset[tuple[str, str]]:
    return frozenset(attributes.items())


def test_exported_values_match_the_report(
    reader: InMemoryMetricReader, accumulator: FairnessAccumulator
) -> None:
    FairnessExporter(accumulator, {MODEL: POLICY}, reader.meter, cache_s=0.0)
    fill(accumulator)
    report = accumulator.report({MODEL: POLICY})
    counts = accumulator.store.counts()

    metrics = collect(reader)

    for name, field in [
        ("predictions", "n"),
        ("selected", "selected"),
        ("labelled", "labelled"),
        ("true_positives", "true_pos"),
        ("label_positives", "label_pos"),
        ("false_positives", "false_pos"),
    ]:
        metric, points = metrics[f"{PREFIX}.{name}"]
        assert isinstance(metric.data, Sum)
        assert metric.data.is_monotonic
        assert metric.unit == "{prediction}"
        assert points == {
            key(model=c.model, attribute=c.attribute, group=c.group): getattr(c, field)
            for c in counts
        }

    _, rates = metrics[f"{PREFIX}.selection_rate"]
    for attribute, attr in report.models[MODEL].attributes.items():
        for group, g in attr.groups.items():
            got = rates[key(model=MODEL, attribute=attribute, group=group)]
            assert got == pytest.approx(g.selection_rate, abs=1e-12)
        for figure in (
            "disparate_impact_ratio",
            "demographic_parity_difference",
            "equal_opportunity_difference",
        ):
            expected = getattr(attr, figure)
            _, points = metrics.get(f"{PREFIX}.{figure}", (None, {}))
            if expected is None:
                assert key(model=MODEL, attribute=attribute) not in points
            else:
                assert points[key(model=MODEL, attribute=attribute)] == pytest.approx(
                    expected, abs=1e-12
                )

    # The small <25 group is excluded, so age_band has one eligible group: no figures.
    assert report.models[MODEL].attributes["age_band"].demographic_parity_difference is None
    assert report.models[MODEL].attributes["sex"].demographic_parity_difference is not None
    assert metrics[f"{PREFIX}.dropped_events"][1] == {frozenset(): 0}


def test_counters_stay_cumulative_between_collections(
    reader: InMemoryMetricReader, accumulator: FairnessAccumulator
) -> None:
    FairnessExporter(accumulator, {MODEL: POLICY}, reader.meter, cache_s=0.0)
    fill(accumulator)
    first = collect(reader)[f"{PREFIX}.predictions"][1]

    fill(accumulator, start=40)
    second = collect(reader)[f"{PREFIX}.predictions"][1]

    assert second[key(model=MODEL, attribute="sex", group="female")] == 40
    assert first[key(model=MODEL, attribute="sex", group="female")] == 20


def test_one_store_read_serves_a_whole_collection(
    reader: InMemoryMetricReader, accumulator: FairnessAccumulator
) -> None:
    FairnessExporter(accumulator.store, {MODEL: POLICY}, reader.meter, cache_s=60.0)
    fill(accumulator)
    first = collect(reader)

    fill(accumulator, start=40)
    second = collect(reader)

    assert second[f"{PREFIX}.predictions"][1] == first[f"{PREFIX}.predictions"][1]
    assert f"{PREFIX}.dropped_events" not in first


def test_a_failing_store_never_breaks_collection(
    reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    store = FairnessStore(":memory:")
    exporter = FairnessExporter(store, {MODEL: POLICY}, reader.meter)
    store.close()
    caplog.set_level(logging.WARNING, logger="guarded_serving.fairness")

    metrics = collect(reader)

    assert all(not points for _, points in metrics.values())
    assert exporter.collection_errors == 1
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert exporter.snapshot() is None
