"""The accumulator's queue and worker: ordering, draining, dropping and restarts."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, selection_rate, true_positive_rate

from guarded_serving.fairness import (
    AccumulatorUnavailable,
    FairnessAccumulator,
    FairnessStore,
    GroupCounts,
    LabelEvent,
    PredictionEvent,
)
from guarded_serving.policy import Policy

MODEL = "credit_risk"


def event(
    ids: list[str], predicted: list[int], sexes: list[str], ts: float = 50.0
) -> PredictionEvent:
    return PredictionEvent(
        model=MODEL,
        version="1",
        request_id=f"req-{ids[0]}",
        timestamp_s=ts,
        record_ids=tuple(ids),
        predicted=tuple(predicted),
        groups=tuple({"sex": s} for s in sexes),
    )


def totals(store: FairnessStore) -> dict[tuple[str, str], GroupCounts]:
    return {(c.attribute, c.group): c for c in store.counts()}


@pytest.fixture
def store() -> Iterator[FairnessStore]:
    s = FairnessStore(":memory:")
    yield s
    s.close()


@pytest.fixture
def running(store: FairnessStore) -> Iterator[FairnessAccumulator]:
    acc = FairnessAccumulator(store, window_s=3600)
    acc.start()
    yield acc
    acc.stop()


def test_a_label_sent_right_after_its_prediction_is_joined(running: FairnessAccumulator) -> None:
    for i in range(20):
        assert running.record(event([f"r{i}"], [i % 2], ["female"]))

    result = running.feedback([LabelEvent(f"r{i}", 1) for i in range(20)])

    assert result.accepted == 20
    assert result.unknown == ()
    female = totals(running.store)["sex", "female"]
    assert (female.n, female.labelled, female.true_pos) == (20, 20, 10)


def test_flush_waits_for_everything_queued_before_it(running: FairnessAccumulator) -> None:
    for i in range(200):
        running.record(event([f"a{i}", f"b{i}"], [1, 0], ["female", "male"]))

    assert running.flush(timeout_s=5.0)

    counts = totals(running.store)
    assert counts["sex", "female"].n == 200
    assert counts["sex", "female"].selected == 200
    assert counts["sex", "male"].selected == 0


def test_full_queue_drops_counts_and_warns_once(
    store: FairnessStore, caplog: pytest.LogCaptureFixture
) -> None:
    acc = FairnessAccumulator(store, max_queue=2)
    caplog.set_level(logging.WARNING, logger="guarded_serving.fairness")

    outcomes = [acc.record(event([f"r{i}"], [1], ["male"])) for i in range(5)]

    assert outcomes == [True, True, False, False, False]
    assert acc.dropped == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1

    acc.start()
    try:
        assert acc.flush()
        assert totals(store)["sex", "male"].n == 2
    finally:
        acc.stop()


def test_record_never_raises(running: FairnessAccumulator) -> None:
    assert running.record(None) is False  # type: ignore[arg-type]
    assert running.record("not an event") is False  # type: ignore[arg-type]

    assert running.invalid == 2


def test_malformed_events_are_dropped_and_the_worker_carries_on(
    running: FairnessAccumulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="guarded_serving.fairness")
    bad = PredictionEvent(MODEL, "1", "req", 1.0, ("x", "y"), (1,), ({"sex": "male"},) * 2)

    running.record(bad)
    running.record(event(["ok"], [1], ["male"]))

    assert running.flush()
    assert running.invalid == 1
    assert totals(running.store)["sex", "male"].n == 1
    assert running.running


def test_store_failures_are_logged_and_the_worker_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fairness.sqlite"
    store = FairnessStore(path)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON predictions WHEN NEW.record_id = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
    caplog.set_level(logging.ERROR, logger="guarded_serving.fairness")

    with FairnessAccumulator(store) as acc:
        acc.record(event(["boom"], [1], ["male"]))
        acc.record(event(["fine"], [1], ["male"]))
        assert acc.flush()

        assert acc.failed == 1
        assert acc.running
        assert totals(store)["sex", "male"].n == 1
        assert any(r.exc_info for r in caplog.records if r.levelno == logging.ERROR)
    store.close()


def test_stop_drains_and_a_restart_on_the_same_file_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "fairness.sqlite"
    store = FairnessStore(path)
    acc = FairnessAccumulator(store)
    acc.start()
    for i in range(50):
        acc.record(event([f"r{i}"], [1], ["female" if i % 2 else "male"]))
    assert acc.stop()
    before = store.counts()
    store.close()

    reopened = FairnessStore(path)
    with FairnessAccumulator(reopened) as again:
        assert reopened.counts() == before
        assert sum(c.n for c in before) == 50
        result = again.feedback([LabelEvent("r0", 1), LabelEvent("r1", 0)])
        again.record(event(["r0", "r50"], [0, 0], ["male", "male"]))
        assert again.flush()
    assert result.accepted == 2
    male = totals(reopened)["sex", "male"]
    assert (male.n, male.selected, male.labelled, male.true_pos) == (26, 25, 1, 1)
    reopened.close()


def test_events_recorded_while_stopped_are_applied_after_a_restart(
    store: FairnessStore,
) -> None:
    acc = FairnessAccumulator(store)
    acc.start()
    acc.stop()

    acc.record(event(["late"], [1], ["female"]))
    assert store.counts() == []
    assert acc.flush() is False

    acc.start()
    assert acc.flush()
    assert totals(store)["sex", "female"].n == 1
    acc.stop()


def test_feedback_without_a_worker_fails_clearly(store: FairnessStore) -> None:
    acc = FairnessAccumulator(store)

    with pytest.raises(AccumulatorUnavailable) as caught:
        acc.feedback([LabelEvent("r", 1)])

    assert isinstance(caught.value, TimeoutError)
    assert caught.value.code == "fairness_unavailable"
    assert caught.value.status_code == 503


def test_feedback_refuses_labels_that_are_not_binary(running: FairnessAccumulator) -> None:
    with pytest.raises(ValueError):
        running.feedback([LabelEvent("r", 2)])


def test_report_equals_fairlearn(running: FairnessAccumulator) -> None:
    rng = np.random.default_rng(7)
    n = 400
    df = pd.DataFrame(
        {
            "sex": rng.choice(["female", "male"], n),
            "age_band": rng.choice(["<25", "25-60", ">60"], n),
            "y_true": rng.integers(0, 2, n),
        }
    )
    df["y_pred"] = (rng.random(n) < np.where(df["sex"] == "female", 0.4, 0.6)).astype(int)
    ids = [f"rec-{i}" for i in range(n)]
    for start in range(0, n, 25):
        rows = df.iloc[start : start + 25]
        running.record(
            PredictionEvent(
                model=MODEL,
                version="1",
                request_id=f"req-{start}",
                timestamp_s=1_000.0 + start,
                record_ids=tuple(ids[start : start + 25]),
                predicted=tuple(int(v) for v in rows["y_pred"]),
                groups=tuple(
                    {"sex": s, "age_band": a}
                    for s, a in zip(rows["sex"], rows["age_band"], strict=True)
                ),
            )
        )
    running.feedback([LabelEvent(i, int(y)) for i, y in zip(ids, df["y_true"], strict=True)])
    policy = Policy.model_validate(
        {
            "model": MODEL,
            "features": [{"name": "amount", "type": "float", "min": 0, "max": 1}],
            "protected_attributes": [
                {"name": "sex", "groups": ["female", "male"]},
                {"name": "age_band", "groups": ["<25", "25-60", ">60"]},
            ],
            "output": {"positive_label": "good", "negative_label": "bad"},
            "fairness": {"min_group_size": 1},
        }
    )

    report = running.report({MODEL: policy}, model=MODEL)

    for attribute in ("sex", "age_band"):
        frame = MetricFrame(
            metrics={"selection_rate": selection_rate, "tpr": true_positive_rate},
            y_true=df["y_true"],
            y_pred=df["y_pred"],
            sensitive_features=df[attribute],
        )
        got = report.models[MODEL].attributes[attribute]
        for group, row in frame.by_group.iterrows():
            assert got.groups[group].selection_rate == pytest.approx(
                row["selection_rate"], abs=1e-9
            )
            assert got.groups[group].true_positive_rate == pytest.approx(row["tpr"], abs=1e-9)
        diff = frame.difference(method="between_groups")
        assert got.demographic_parity_difference == pytest.approx(diff["selection_rate"], abs=1e-9)
        assert got.equal_opportunity_difference == pytest.approx(diff["tpr"], abs=1e-9)
        assert got.disparate_impact_ratio == pytest.approx(
            frame.ratio(method="between_groups")["selection_rate"], abs=1e-9
        )


def test_report_can_start_at_a_later_window(running: FairnessAccumulator) -> None:
    running.record(event(["early"], [1], ["male"], ts=10.0))
    running.record(event(["late"], [0], ["male"], ts=7_300.0))
    assert running.flush()

    everything = running.report().models[MODEL].attributes["sex"].groups["male"]
    recent = running.report(since_timestamp_s=7_250.0).models[MODEL].attributes["sex"]

    assert everything.n == 2
    assert recent.groups["male"].n == 1
    assert recent.groups["male"].selected == 0


def test_the_report_can_leave_out_models_without_a_policy(running: FairnessAccumulator) -> None:
    running.record(event(["a"], [1], ["male"]))
    assert running.flush()

    assert MODEL in running.report().models
    assert running.report({}, known_only=True).models == {}
