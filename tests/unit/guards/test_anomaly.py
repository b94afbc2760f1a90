"""Stage 4, anomaly: kNN distance, calibration to a target rate, flag or reject."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guarded_serving.encoding import TabularEncoder
from guarded_serving.errors import GuardRejected
from guarded_serving.guards.anomaly import AnomalyGuard, KNNAnomalyDetector
from guarded_serving.policy import AnomalyPolicy, Policy
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Outcome, ScoringRequest

DIM = 4
NUMERIC = [True] * DIM
TARGET_FPR = 0.05
CALIBRATION_ROWS = 2_000
FRESH_ROWS = 8_000


def _gaussian(rng: np.random.Generator, rows: int) -> np.ndarray:
    mean = np.array([10.0, -3.0, 0.0, 250.0])
    scale = np.array([1.0, 0.5, 4.0, 40.0])
    return rng.normal(size=(rows, DIM)) * scale + mean


@pytest.fixture(scope="module")
def detector() -> KNNAnomalyDetector:
    rng = np.random.default_rng(20240611)
    train = _gaussian(rng, 3_000)
    calibration = _gaussian(rng, CALIBRATION_ROWS)
    return KNNAnomalyDetector(neighbours=5).fit(train, NUMERIC).calibrate(calibration, TARGET_FPR)


# Four numeric features, so that the encoder's matrix is the rows themselves.
_POLICY = Policy(
    model="gaussian",
    features=[{"name": f"x{i}", "type": "float", "min": -1e9, "max": 1e9} for i in range(DIM)],
    output={"positive_label": "yes", "negative_label": "no"},
)
_ENCODER = TabularEncoder(_POLICY)


def _request(matrix: np.ndarray) -> ScoringRequest:
    """A request as the schema guard leaves it: validated records as model input."""
    records = [{f"x{i}": float(v) for i, v in enumerate(row)} for row in matrix]
    request = ScoringRequest(
        request_id="req-1",
        model=None,  # type: ignore[arg-type]
        api_key=None,
        raw_records=records,
    )
    request.records = records
    request.inputs = ModelInput(records, _ENCODER)
    # The guard scores the encoder's matrix, which here is the rows themselves.
    np.testing.assert_array_equal(request.inputs.matrix, matrix.astype(np.float32))
    return request


def test_calibration_records_what_it_did(detector: KNNAnomalyDetector) -> None:
    assert detector.calibration_rows_ == CALIBRATION_ROWS
    assert detector.target_fpr_ == TARGET_FPR
    assert detector.calibration_fpr_ <= TARGET_FPR
    assert detector.threshold_ > 0


def test_fresh_in_distribution_rows_are_flagged_near_the_target_rate(
    detector: KNNAnomalyDetector,
) -> None:
    fresh = _gaussian(np.random.default_rng(99), FRESH_ROWS)

    rate = float(np.mean(detector.score(fresh) > detector.threshold_))

    # The conformal threshold gives a rate of at most the target in expectation. Given
    # the calibration set, the rate varies by about sqrt(p(1-p)/n_cal) = 0.005 and the
    # fresh sample adds sqrt(p(1-p)/n_fresh) = 0.0024; four combined deviations is 0.022.
    spread = math.sqrt(TARGET_FPR * (1 - TARGET_FPR) * (1 / CALIBRATION_ROWS + 1 / FRESH_ROWS))
    assert rate <= TARGET_FPR + 4 * spread
    # Not vacuously conservative either.
    assert rate >= TARGET_FPR - 4 * spread


def test_far_away_rows_are_flagged(detector: KNNAnomalyDetector) -> None:
    rng = np.random.default_rng(5)
    shifted = _gaussian(rng, 200) + np.array([8.0, 0.0, 0.0, 0.0])
    scaled = _gaussian(rng, 200) * np.array([1.0, 1.0, 1.0, 3.0])
    extreme = np.array([[10.0, -3.0, 0.0, 1e6], [1e3, -3.0, 0.0, 250.0]])

    assert np.all(detector.score(shifted) > detector.threshold_)
    assert np.all(detector.score(extreme) > detector.threshold_)
    assert np.all(detector.score(extreme) > 100 * detector.threshold_)
    assert np.mean(detector.score(scaled) > detector.threshold_) > 0.5


def test_scores_do_not_depend_on_the_block_a_row_is_scored_in(
    detector: KNNAnomalyDetector,
) -> None:
    rows = _gaussian(np.random.default_rng(3), 600)

    together = detector.score(rows)
    alone = np.concatenate([detector.score(rows[i : i + 1]) for i in range(0, 600, 37)])

    np.testing.assert_allclose(together[::37], alone, rtol=1e-9, atol=1e-9)


def test_a_different_category_adds_one_to_the_squared_distance() -> None:
    # Columns: one number, then a two-code category.
    reference = np.array([[0.0, 1, 0], [10.0, 1, 0], [20.0, 0, 1]])
    detector = KNNAnomalyDetector(neighbours=1).fit(reference, [True, False, False])

    scores = detector.score(np.array([[0.0, 1, 0], [0.0, 0, 1]]))

    np.testing.assert_allclose(scores, [0.0, 1.0], atol=1e-12)


def test_bytes_roundtrip_gives_identical_scores(detector: KNNAnomalyDetector) -> None:
    rows = _gaussian(np.random.default_rng(11), 300)

    copy = KNNAnomalyDetector.from_bytes(detector.to_bytes())

    np.testing.assert_array_equal(copy.score(rows), detector.score(rows))
    assert copy.neighbours == detector.neighbours
    assert copy.threshold_ == detector.threshold_
    assert copy.calibration_rows_ == detector.calibration_rows_
    assert copy.calibration_fpr_ == detector.calibration_fpr_
    assert copy.target_fpr_ == detector.target_fpr_


def test_fit_is_deterministic_when_subsampling_large_training_sets() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(20_500, 2))
    rows = rng.normal(size=(50, 2))

    first = KNNAnomalyDetector(neighbours=3, seed=4).fit(train, [True, True])
    second = KNNAnomalyDetector(neighbours=3, seed=4).fit(train, [True, True])

    assert first.reference_.shape == (20_000, 2)
    np.testing.assert_array_equal(first.score(rows), second.score(rows))


def test_fit_needs_more_rows_than_neighbours_and_a_mask_per_column() -> None:
    with pytest.raises(ValueError):
        KNNAnomalyDetector(neighbours=5).fit(np.zeros((5, 2)), [True, True])
    with pytest.raises(ValueError):
        KNNAnomalyDetector(neighbours=1).fit(np.zeros((5, 2)), [True])


def test_guard_passes_in_distribution_rows(detector: KNNAnomalyDetector) -> None:
    rows = np.array([[10.0, -3.0, 0.0, 250.0], [10.5, -3.2, 1.0, 260.0]])
    request = _request(rows)

    AnomalyGuard(detector, AnomalyPolicy(action="reject"))(request)

    assert request.anomaly_flags is not None and not request.anomaly_flags.any()
    assert request.anomaly_scores is not None and request.anomaly_scores.shape == (2,)
    assert [(v.stage, v.outcome, v.code) for v in request.verdicts] == [
        ("anomaly", Outcome.PASS, None)
    ]


def test_guard_flags_anomalous_rows_when_the_action_is_flag(
    detector: KNNAnomalyDetector,
) -> None:
    rows = np.array([[10.0, -3.0, 0.0, 250.0], [10.0, -3.0, 0.0, 1e6]])
    request = _request(rows)

    AnomalyGuard(detector, AnomalyPolicy(action="flag"))(request)

    assert request.anomaly_flags is not None
    assert request.anomaly_flags.tolist() == [False, True]
    assert [(v.stage, v.outcome, v.code) for v in request.verdicts] == [
        ("anomaly", Outcome.FLAG, "input_anomalous")
    ]


def test_guard_rejects_naming_the_first_anomalous_row_when_the_action_is_reject(
    detector: KNNAnomalyDetector,
) -> None:
    rows = np.array([[10.0, -3.0, 0.0, 250.0], [10.0, -3.0, 0.0, 1e6], [1e3, -3.0, 0.0, 250.0]])
    request = _request(rows)

    with pytest.raises(GuardRejected) as caught:
        AnomalyGuard(detector, AnomalyPolicy(action="reject"))(request)

    error = caught.value
    assert (error.code, error.field, error.guard) == ("input_anomalous", "records[1]", "anomaly")
    assert error.status_code == 422
    assert request.verdicts[-1].outcome is Outcome.REJECT
    assert request.verdicts[-1].code == "input_anomalous"
    # The client sees the code and the row, never the score or the threshold.
    body = error.to_dict(request_id="req-1")
    assert body == {
        "error": "request rejected",
        "code": "input_anomalous",
        "field": "records[1]",
        "request_id": "req-1",
    }
