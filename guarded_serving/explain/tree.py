"""Stage 8, explain (trees): exact TreeSHAP, reported per original input feature.

xgboost computes the exact Shapley values of its trees (the TreeSHAP algorithm) in
the margin space. One-hot columns of a categorical feature are summed back into that
feature, which keeps additivity: base value + sum of attributions = margin.
"""

from __future__ import annotations

import numpy as np

from guarded_serving.encoding import TabularEncoder
from guarded_serving.runtimes.xgboost import XGBoostRuntime
from guarded_serving.types import Explanation, ScoringRequest

METHOD = "tree_shap"


class TreeExplainer:
    """Explain every row of a request scored by an xgboost model."""

    name = "explain"

    def __init__(self, runtime: XGBoostRuntime, encoder: TabularEncoder) -> None:
        self.runtime = runtime
        self.encoder = encoder
        self._names = list(encoder.feature_columns)

    def explain(self, matrix: np.ndarray) -> list[Explanation]:
        contributions = self.runtime.contributions(matrix)
        per_feature = self.encoder.fold(contributions[:, :-1])
        bias = contributions[:, -1].astype(np.float64)
        return [
            Explanation(
                method=METHOD,
                base_value=float(bias[row]),
                attributions=dict(zip(self._names, per_feature[row].tolist(), strict=True)),
            )
            for row in range(matrix.shape[0])
        ]

    def __call__(self, request: ScoringRequest) -> None:
        if request.explain:
            request.explanations = self.explain(request.matrix)
