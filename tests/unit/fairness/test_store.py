"""The SQLite fairness store: atomic batches, joins, windows and persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from guarded_serving.errors import ConfigError
from guarded_serving.fairness import FairnessStore, GroupCounts, LabelEvent, PredictionEvent

HOUR = 3600


def event(
    ids: list[str],
    predicted: list[int],
    groups: list[dict[str, str]],
    timestamp_s: float = 1_000.0,
    model: str = "credit_risk",
) -> PredictionEvent:
    return PredictionEvent(
        model=model,
        version="1",
        request_id="req-1",
        timestamp_s=timestamp_s,
        record_ids=tuple(ids),
        predicted=tuple(predicted),
        groups=tuple(groups),
    )


F = {"sex": "female", "age_band": "<25"}
M = {"sex": "male", "age_band": "25-60"}


def by_key(counts: list[GroupCounts]) -> dict[tuple[str, str, str], GroupCounts]:
    return {(c.model, c.attribute, c.group): c for c in counts}


@pytest.fixture
def store() -> Iterator[FairnessStore]:
    s = FairnessStore(":memory:")
    yield s
    s.close()


def test_predictions_and_labels_build_confusion_counts(store: FairnessStore) -> None:
    store.apply_predictions(event(["a", "b", "c", "d"], [1, 0, 1, 1], [F, F, M, M]), HOUR)

    result = store.apply_labels(
        [LabelEvent("a", 1), LabelEvent("b", 1), LabelEvent("c", 0), LabelEvent("d", 1)]
    )

    assert result.accepted == 4
    counts = by_key(store.counts())
    assert counts["credit_risk", "sex", "female"] == GroupCounts(
        "credit_risk", "sex", "female", n=2, selected=1, labelled=2, label_pos=2, true_pos=1
    )
    assert counts["credit_risk", "sex", "male"] == GroupCounts(
        "credit_risk",
        "sex",
        "male",
        n=2,
        selected=2,
        labelled=2,
        label_pos=1,
        true_pos=1,
        false_pos=1,
    )
    assert counts["credit_risk", "age_band", "<25"].n == 2


def test_state_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "fairness.sqlite"
    first = FairnessStore(path)
    first.apply_predictions(event(["a", "b", "c"], [1, 0, 1], [F, M, M]), HOUR)
    first.apply_labels([LabelEvent("a", 1)])
    before = first.counts()
    first.close()

    second = FairnessStore(path)
    try:
        assert second.counts() == before
        assert second.models() == ["credit_risk"]
        result = second.apply_labels([LabelEvent("a", 0), LabelEvent("b", 0)])
        assert result.accepted == 1
        assert result.already_labelled == ("a",)
        second.apply_predictions(event(["a"], [0], [F]), HOUR)
        assert by_key(second.counts())["credit_risk", "sex", "female"].n == 1
    finally:
        second.close()


def test_database_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "fairness.sqlite"
    FairnessStore(path).close()

    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_record_ids_count_once(store: FairnessStore) -> None:
    stored = store.apply_predictions(event(["a", "a", "b"], [1, 0, 1], [F, F, M]), HOUR)
    again = store.apply_predictions(event(["b", "c"], [0, 1], [M, M]), HOUR)

    assert (stored, again) == (2, 1)
    counts = by_key(store.counts())
    assert counts["credit_risk", "sex", "female"].n == 1
    assert counts["credit_risk", "sex", "female"].selected == 1
    assert counts["credit_risk", "sex", "male"].n == 2
    assert counts["credit_risk", "sex", "male"].selected == 2


def test_unknown_and_repeated_labels_change_nothing(store: FairnessStore) -> None:
    store.apply_predictions(event(["a", "b"], [1, 1], [F, F]), HOUR)
    store.apply_labels([LabelEvent("a", 1)])

    result = store.apply_labels(
        [LabelEvent("zzz", 1), LabelEvent("a", 0), LabelEvent("b", 0), LabelEvent("b", 1)]
    )

    assert result.accepted == 1
    assert result.unknown == ("zzz",)
    assert result.already_labelled == ("a", "b")
    female = by_key(store.counts())["credit_risk", "sex", "female"]
    assert (female.labelled, female.label_pos, female.true_pos, female.false_pos) == (2, 1, 1, 1)


def test_a_label_for_another_model_is_unknown(store: FairnessStore) -> None:
    store.apply_predictions(event(["a"], [1], [F]), HOUR)
    store.apply_predictions(event(["b"], [1], [F], model="pneumonia"), HOUR)

    result = store.apply_labels(
        [LabelEvent("a", 0, model="pneumonia"), LabelEvent("b", 1, model="pneumonia")]
    )

    assert (result.accepted, result.unknown) == (1, ("a",))
    assert by_key(store.counts())["credit_risk", "sex", "female"].labelled == 0
    # The record can still be labelled for the model that scored it.
    assert store.apply_labels([LabelEvent("a", 1, model="credit_risk")]).accepted == 1


def test_counts_sum_windows_and_filter_by_window(store: FairnessStore) -> None:
    store.apply_predictions(event(["a", "b"], [1, 0], [F, F], timestamp_s=100.0), HOUR)
    store.apply_predictions(event(["c"], [1], [F], timestamp_s=HOUR + 5.0), HOUR)
    store.apply_predictions(event(["d"], [1], [F], timestamp_s=3 * HOUR + 1.0), HOUR)
    # A label counts in its prediction's window, however late it arrives.
    store.apply_labels([LabelEvent("a", 1)])

    everything = by_key(store.counts())["credit_risk", "sex", "female"]
    later = by_key(store.counts(since_window_start=HOUR))["credit_risk", "sex", "female"]

    assert (everything.n, everything.selected, everything.labelled) == (4, 3, 1)
    assert (later.n, later.selected, later.labelled) == (2, 2, 0)


def test_counts_filter_by_model_and_list_models(store: FairnessStore) -> None:
    store.apply_predictions(event(["a"], [1], [F], model="credit_risk"), HOUR)
    store.apply_predictions(event(["b"], [1], [{}], model="pneumonia"), HOUR)

    assert store.models() == ["credit_risk", "pneumonia"]
    assert {c.model for c in store.counts(model="credit_risk")} == {"credit_risk"}
    assert store.counts(model="pneumonia") == []


def test_record_without_an_attribute_is_not_counted_for_it(store: FairnessStore) -> None:
    store.apply_predictions(event(["a", "b"], [1, 1], [{"sex": "female"}, F]), HOUR)
    store.apply_labels([LabelEvent("a", 1), LabelEvent("b", 1)])

    counts = by_key(store.counts())

    assert counts["credit_risk", "sex", "female"].n == 2
    assert counts["credit_risk", "sex", "female"].true_pos == 2
    assert counts["credit_risk", "age_band", "<25"].n == 1
    assert counts["credit_risk", "age_band", "<25"].true_pos == 1


def test_malformed_input_is_refused_before_anything_is_stored(store: FairnessStore) -> None:
    with pytest.raises(ValueError):
        store.apply_predictions(event(["a", "b"], [1], [F, F]), HOUR)
    with pytest.raises(ValueError):
        store.apply_predictions(event(["a"], [2], [F]), HOUR)
    with pytest.raises(TypeError):
        store.apply_predictions(event(["a"], [1], [{"sex": 1}]), HOUR)
    with pytest.raises(ValueError):
        store.apply_predictions(event(["a"], [1], [F], timestamp_s=float("nan")), HOUR)
    with pytest.raises(ValueError):
        store.apply_labels([LabelEvent("a", 3)])

    assert store.counts() == []
    assert store.models() == []


def test_a_failing_batch_is_rolled_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "fairness.sqlite"
    store = FairnessStore(path)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON predictions WHEN NEW.record_id = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
    try:
        with pytest.raises(sqlite3.IntegrityError):
            store.apply_predictions(event(["a", "boom"], [1, 1], [F, M]), HOUR)

        assert store.counts() == []
        assert store.apply_labels([LabelEvent("a", 1)]).unknown == ("a",)
        # The connection is usable again after the rollback.
        assert store.apply_predictions(event(["a"], [1], [F]), HOUR) == 1
        assert by_key(store.counts())["credit_risk", "sex", "female"].n == 1
    finally:
        store.close()


def test_pruned_predictions_keep_their_counts(store: FairnessStore) -> None:
    store.apply_predictions(event(["old"], [1], [F], timestamp_s=10.0), HOUR)
    store.apply_predictions(event(["new"], [1], [F], timestamp_s=2 * HOUR), HOUR)

    assert store.prune_predictions(before_window_start=HOUR) == 1

    result = store.apply_labels([LabelEvent("old", 1), LabelEvent("new", 1)])
    assert result.unknown == ("old",)
    assert result.accepted == 1
    assert by_key(store.counts())["credit_risk", "sex", "female"].n == 2


def test_a_store_from_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fairness.sqlite"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")

    with pytest.raises(ConfigError) as caught:
        FairnessStore(path)

    assert caught.value.code == "config_error"


def test_an_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        FairnessStore(tmp_path / "missing-dir" / "fairness.sqlite")
