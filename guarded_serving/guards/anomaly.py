"""Stage 4, anomaly: how far each row lies from the training data.

The score of a row is its mean Euclidean distance to its ``k`` nearest training
rows, after standardizing numeric columns on the training data (one-hot columns are
scaled so that a differing category adds 1 to the squared distance). The threshold is
a conformal quantile of the scores of held-out in-distribution rows, so that the share
of such rows flagged is at most the policy's target false-positive rate.

Known limitations: the detector sees only the encoded feature space, so it misses
inputs that are ordinary row by row but crafted to move the model across its
decision boundary (adversarial examples near the data); it does not look at sequences
of requests (the extraction stage's job); and with few training rows its threshold
is coarse (the calibration count is stored with the detector and printed at training).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence

import numpy as np

from guarded_serving.errors import GuardRejected
from guarded_serving.policy import AnomalyPolicy
from guarded_serving.types import Outcome, ScoringRequest, Verdict

logger = logging.getLogger(__name__)

# Rows compared per block, to bound the distance matrix in memory.
_BLOCK_ROWS = 256
# Reference rows kept; larger training sets are subsampled (seeded).
_MAX_REFERENCE_ROWS = 20_000


class KNNAnomalyDetector:
    """k-nearest-neighbour distance to the training data, with a calibrated threshold.

    Args:
        neighbours: k, the number of nearest training rows averaged.
        seed: Seed for subsampling large training sets.
        max_reference_rows: Training rows kept as the reference (a seeded sample).
    """

    def __init__(
        self, neighbours: int = 5, seed: int = 0, max_reference_rows: int = _MAX_REFERENCE_ROWS
    ) -> None:
        self.neighbours = neighbours
        self.seed = seed
        self.max_reference_rows = max_reference_rows

    def fit(self, matrix: np.ndarray, numeric_mask: Sequence[bool]) -> KNNAnomalyDetector:
        """Learn the scaling and keep the reference rows."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] <= self.neighbours:
            raise ValueError(
                f"need more than {self.neighbours} training rows (got {matrix.shape[0]})"
            )
        if len(numeric_mask) != matrix.shape[1]:
            raise ValueError("numeric_mask must have one entry per column")
        if matrix.shape[0] > self.max_reference_rows:
            rng = np.random.default_rng(self.seed)
            keep = rng.choice(matrix.shape[0], self.max_reference_rows, replace=False)
            matrix = matrix[np.sort(keep)]
        numeric = np.asarray(numeric_mask, dtype=bool)
        center = np.where(numeric, matrix.mean(axis=0), 0.0)
        spread = np.where(numeric, matrix.std(axis=0), math.sqrt(2.0))
        self.center_ = center
        self.scale_ = np.where(spread > 1e-12, spread, 1.0)
        self.reference_ = (matrix - self.center_) / self.scale_
        return self

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Mean distance of each row to its k nearest reference rows (higher is stranger)."""
        z = (np.asarray(matrix, dtype=np.float64) - self.center_) / self.scale_
        ref = self.reference_
        ref_sq = np.einsum("ij,ij->i", ref, ref)
        out = np.empty(z.shape[0], dtype=np.float64)
        k = self.neighbours
        for start in range(0, z.shape[0], _BLOCK_ROWS):
            block = z[start : start + _BLOCK_ROWS]
            sq = (
                np.einsum("ij,ij->i", block, block)[:, None]
                + ref_sq[None, :]
                - 2.0 * block @ ref.T
            )
            np.maximum(sq, 0.0, out=sq)
            nearest = np.partition(sq, k - 1, axis=1)[:, :k]
            out[start : start + len(block)] = np.sqrt(nearest).mean(axis=1)
        return out

    def calibrate(self, matrix: np.ndarray, target_fpr: float) -> KNNAnomalyDetector:
        """Set ``threshold_`` from held-out in-distribution rows.

        The threshold is the ceil((n + 1)(1 - fpr))-th smallest held-out score (the
        split-conformal quantile), so a new in-distribution row exceeds it with
        probability at most ``target_fpr``. With too few rows for that rank the
        largest score is used and the achieved rate is reported as is.
        """
        scores = np.sort(self.score(matrix))
        n = len(scores)
        rank = math.ceil((n + 1) * (1.0 - target_fpr))
        self.threshold_ = float(scores[min(rank, n) - 1])
        self.calibration_rows_ = n
        self.calibration_fpr_ = float(np.mean(scores > self.threshold_))
        self.target_fpr_ = float(target_fpr)
        return self

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            neighbours=np.array(self.neighbours),
            center=self.center_,
            scale=self.scale_,
            reference=self.reference_,
            threshold=np.array(self.threshold_),
            calibration_rows=np.array(self.calibration_rows_),
            calibration_fpr=np.array(self.calibration_fpr_),
            target_fpr=np.array(self.target_fpr_),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KNNAnomalyDetector:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            detector = cls(neighbours=int(arrays["neighbours"]))
            detector.center_ = arrays["center"]
            detector.scale_ = arrays["scale"]
            detector.reference_ = arrays["reference"]
            detector.threshold_ = float(arrays["threshold"])
            detector.calibration_rows_ = int(arrays["calibration_rows"])
            detector.calibration_fpr_ = float(arrays["calibration_fpr"])
            detector.target_fpr_ = float(arrays["target_fpr"])
        return detector


class AnomalyGuard:
    """Flag or reject rows whose anomaly score passes the calibrated threshold.

    Raises:
        GuardRejected: ``input_anomalous``, naming the first such row, when the policy's
            action is ``reject``.
    """

    name = "anomaly"

    def __init__(self, detector: KNNAnomalyDetector, policy: AnomalyPolicy) -> None:
        self.detector = detector
        self.policy = policy

    def __call__(self, request: ScoringRequest) -> None:
        scores = self.detector.score(request.inputs.matrix)
        flags = scores > self.detector.threshold_
        request.anomaly_scores = scores
        request.anomaly_flags = flags
        if not flags.any():
            request.verdicts.append(Verdict(self.name, Outcome.PASS))
            return
        if self.policy.action == "reject":
            request.verdicts.append(Verdict(self.name, Outcome.REJECT, "input_anomalous"))
            first = int(np.flatnonzero(flags)[0])
            raise GuardRejected(self.name, "input_anomalous", field=f"records[{first}]")
        request.verdicts.append(Verdict(self.name, Outcome.FLAG, "input_anomalous"))
