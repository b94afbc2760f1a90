"""Exact TreeSHAP for tree ensembles, reported per original input feature.

xgboost computes the exact Shapley values of its own trees; scikit-learn forests and
gradient boosting go through shap's TreeExplainer on the pipeline's transformed
columns. Columns that one input feature produced (its one-hot block, say) are summed
back into that feature, which keeps additivity: base value + sum = model output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from guarded_serving.encoding import TabularEncoder
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Explanation

METHOD = "tree_shap"
# Float32 tree arithmetic: base value + attributions match the margin to this.
TOLERANCE = 1e-5


class XGBoostTreeExplainer:
    """xgboost's native TreeSHAP on the one-hot matrix, folded back per feature."""

    method = METHOD

    def __init__(self, runtime: Any, encoder: TabularEncoder) -> None:
        self.runtime = runtime
        self.encoder = encoder
        self._names = list(encoder.feature_columns)

    def explain(self, inputs: ModelInput, deadline_s: float | None = None) -> list[Explanation]:
        contributions = self.runtime.contributions(inputs.matrix)
        per_feature = self.encoder.fold(contributions[:, :-1])
        bias = contributions[:, -1].astype(np.float64)
        return [
            Explanation(
                method=METHOD,
                base_value=float(bias[row]),
                attributions=dict(zip(self._names, per_feature[row].tolist(), strict=True)),
                output_space="log_odds",
                tolerance=TOLERANCE,
            )
            for row in range(len(inputs))
        ]


class SklearnTreeExplainer:
    """shap's TreeExplainer on the last step of a scikit-learn pipeline.

    Args:
        runtime: The scikit-learn runtime (its ``estimator`` a pipeline or an ensemble).
        encoder: The policy's encoder (for feature names).
        column_groups: For each policy feature, the transformed columns it produces.
        output_space: ``log_odds`` for boosting, ``probability`` for forests.
    """

    method = METHOD

    def __init__(
        self,
        runtime: Any,
        encoder: TabularEncoder,
        column_groups: Sequence[Sequence[int]],
        output_space: str,
    ) -> None:
        import shap

        estimator = runtime.estimator
        steps = getattr(estimator, "steps", None)
        self._transform = estimator[:-1].transform if steps else None
        self._model = estimator[-1] if steps else estimator
        self._explainer = shap.TreeExplainer(self._model)
        self._groups = [list(g) for g in column_groups]
        self._names = list(encoder.feature_columns)
        self.output_space = output_space

    def transformed(self, inputs: ModelInput) -> np.ndarray:
        frame = inputs.frame
        out = self._transform(frame) if self._transform is not None else frame.to_numpy()
        return dense(out)

    def raw_values(self, inputs: ModelInput) -> tuple[np.ndarray, np.ndarray]:
        """Per transformed column values and the base value per row (positive class)."""
        values = self._explainer.shap_values(self.transformed(inputs), check_additivity=False)
        base = np.asarray(self._explainer.expected_value, dtype=np.float64).reshape(-1)
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 3:  # one slice per class: keep the positive class
            values, base = values[:, :, -1], base[-1:]
        return values, np.broadcast_to(base[-1], (values.shape[0],))

    def explain(self, inputs: ModelInput, deadline_s: float | None = None) -> list[Explanation]:
        values, base = self.raw_values(inputs)
        folded = np.stack([values[:, g].sum(axis=1) for g in self._groups], axis=1)
        return [
            Explanation(
                method=METHOD,
                base_value=float(base[row]),
                attributions=dict(zip(self._names, folded[row].tolist(), strict=True)),
                output_space=self.output_space,
                tolerance=TOLERANCE,
            )
            for row in range(len(inputs))
        ]


def dense(values: Any) -> np.ndarray:
    """A float64 array from a transformer's output, sparse matrices included."""
    if hasattr(values, "toarray"):
        values = values.toarray()
    return np.asarray(values, dtype=np.float64)


def column_groups(transform: Any, encoder: TabularEncoder, sample: ModelInput) -> list[list[int]]:
    """Find which transformed columns each input feature drives, by changing it alone.

    Each feature of a few sample rows is set to other values (every category, or the
    range ends and middle of a number) and the columns whose value moves are that
    feature's. The groups must not overlap, or per-feature folding would be wrong.

    Raises:
        ValueError: Two features drive a common column, or a column none.
    """
    base_frame = sample.frame.head(8).reset_index(drop=True)
    base_out = dense(transform(base_frame))
    groups: list[list[int]] = []
    for feature in encoder.policy.features:
        alternatives = getattr(feature, "categories", None) or [
            feature.min,
            (feature.min + feature.max) / 2,
            feature.max,
        ]
        moved = np.zeros(base_out.shape[1], dtype=bool)
        for value in alternatives:
            frame = base_frame.copy()
            frame[feature.name] = value
            out = dense(transform(frame))
            moved |= np.any(~np.isclose(out, base_out, equal_nan=True), axis=0)
        groups.append(np.flatnonzero(moved).tolist())
    owners = np.zeros(base_out.shape[1], dtype=int)
    for group in groups:
        owners[group] += 1
    if np.any(owners > 1):
        raise ValueError("some transformed columns depend on more than one input feature")
    if np.any(owners == 0):
        raise ValueError("some transformed columns depend on no input feature")
    return groups
