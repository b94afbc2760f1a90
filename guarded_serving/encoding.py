"""Feature encoding shared by training and serving: validated records to a matrix.

Numeric features pass through as float32; each categorical feature becomes one
column per policy category (one-hot). The encoding is fully determined by the
policy, so training and serving cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guarded_serving.policy import CategoricalFeature, Policy


class TabularEncoder:
    """Encode records (feature name -> value) into the model's input matrix.

    Args:
        policy: The model's policy; its ``features`` fix the column layout.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.columns: list[str] = []
        self.feature_columns: dict[str, slice] = {}
        self.numeric_mask: list[bool] = []
        self._category_index: dict[str, dict[str, int]] = {}
        for feature in policy.features:
            start = len(self.columns)
            if isinstance(feature, CategoricalFeature):
                self._category_index[feature.name] = {
                    c: i for i, c in enumerate(feature.categories)
                }
                self.columns.extend(f"{feature.name}={c}" for c in feature.categories)
                self.numeric_mask.extend([False] * len(feature.categories))
            else:
                self.columns.append(feature.name)
                self.numeric_mask.append(True)
            self.feature_columns[feature.name] = slice(start, len(self.columns))

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    def encode(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Encode already validated records; raises ``KeyError`` on a missing feature."""
        matrix = np.zeros((len(records), self.n_columns), dtype=np.float32)
        for row, record in enumerate(records):
            for name, cols in self.feature_columns.items():
                index = self._category_index.get(name)
                if index is None:
                    matrix[row, cols.start] = float(record[name])
                else:
                    matrix[row, cols.start + index[record[name]]] = 1.0
        return matrix

    def fold(self, column_values: np.ndarray) -> np.ndarray:
        """Sum per-column values (for example SHAP contributions) back per feature.

        Args:
            column_values: Shape ``(rows, n_columns)``.

        Returns:
            Shape ``(rows, n_features)`` in policy feature order.
        """
        out = np.empty((column_values.shape[0], len(self.feature_columns)), dtype=np.float64)
        for j, cols in enumerate(self.feature_columns.values()):
            out[:, j] = column_values[:, cols].astype(np.float64).sum(axis=1)
        return out
