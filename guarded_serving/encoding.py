"""Input encoding shared by training and serving: validated records to model arrays.

Tabular policies: numeric features pass through as float32; each categorical feature
becomes one column per policy category (one-hot). Tensor policies: each record is
already an array of the declared shape, and the batch is stacked. The encoding is
fully determined by the policy, so training and serving cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

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

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one encoded record, as the model takes it."""
        return (self.n_columns,)

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

    def frame(self, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """Raw features as a data frame: numbers as float64, categories as strings."""
        columns: dict[str, Any] = {}
        for name in self.feature_columns:
            values = [record[name] for record in records]
            if name in self._category_index:
                columns[name] = pd.Series(values, dtype=object)
            else:
                columns[name] = pd.Series(values, dtype=np.float64)
        return pd.DataFrame(columns)

    def to_codes(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """One float64 column per feature: the number, or the category's index."""
        codes = np.empty((len(records), len(self.feature_columns)), dtype=np.float64)
        for j, name in enumerate(self.feature_columns):
            index = self._category_index.get(name)
            for row, record in enumerate(records):
                codes[row, j] = float(record[name]) if index is None else index[record[name]]
        return codes

    def from_codes(self, codes: np.ndarray) -> list[dict[str, Any]]:
        """Records back from :meth:`to_codes` output (category indexes are rounded)."""
        names = list(self.feature_columns)
        categories = {
            f.name: f.categories for f in self.policy.features if isinstance(f, CategoricalFeature)
        }
        records = []
        for row in np.asarray(codes, dtype=np.float64):
            record: dict[str, Any] = {}
            for j, name in enumerate(names):
                if name in categories:
                    record[name] = categories[name][int(round(row[j]))]
                else:
                    record[name] = float(row[j])
            records.append(record)
        return records

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


class TensorEncoder:
    """Stack validated tensor records (arrays of the policy's input shape).

    Args:
        policy: A policy with a tensor ``input``.
    """

    def __init__(self, policy: Policy) -> None:
        if policy.input is None:
            raise ValueError("TensorEncoder needs a policy with a tensor input")
        self.policy = policy
        self.input_shape = tuple(policy.input.shape)
        self.n_columns = int(np.prod(self.input_shape))
        self.numeric_mask = [True] * self.n_columns

    def encode(self, records: Sequence[np.ndarray]) -> np.ndarray:
        if len(records) == 0:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return np.stack([np.asarray(r, dtype=np.float32) for r in records])


def encoder_for(policy: Policy) -> TabularEncoder | TensorEncoder:
    """The encoder a policy calls for."""
    return TensorEncoder(policy) if policy.input is not None else TabularEncoder(policy)
