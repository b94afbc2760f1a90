"""How per-column attributions are reported: per feature, or as a map with a summary.

Tabular models report one value per original feature (one-hot columns summed back).
Tensor models report the full map in the input's shape plus a coarse summary that a
person can read at a glance: for 2-D images, sums over square patches (a 7x7 grid
for a 28x28 image); with a named range axis (sensors), the total per name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from guarded_serving.encoding import TabularEncoder, TensorEncoder

# Side of the coarse summary grid for images.
PATCH_GRID = 7

Report = Callable[[np.ndarray], tuple[dict[str, Any], dict[str, Any]]]


def report_for(encoder: TabularEncoder | TensorEncoder) -> Report:
    """A function from one row's column attributions to (attributions, details)."""
    if isinstance(encoder, TabularEncoder):
        names = list(encoder.feature_columns)

        def per_feature(columns: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
            folded = encoder.fold(columns[None, :])[0]
            return dict(zip(names, folded.tolist(), strict=True)), {}

        return per_feature

    spec = encoder.policy.input
    shape = tuple(spec.shape)

    def as_map(columns: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
        grid = columns.reshape(shape)
        attributions: dict[str, Any] = {"map": grid.tolist(), "axes": list(spec.axes)}
        if spec.range_axis is not None:
            other = tuple(a for a in range(len(shape)) if a != spec.range_axis)
            totals = grid.sum(axis=other)
            names = spec.channel_names or [str(i) for i in range(len(totals))]
            attributions["totals"] = dict(zip(names, totals.tolist(), strict=True))
        elif len(shape) == 2:
            attributions["patches"] = patch_sums(grid, PATCH_GRID).tolist()
        return attributions, {}

    return as_map


def patch_sums(grid: np.ndarray, cells: int) -> np.ndarray:
    """Sums over a ``cells x cells`` grid of near-equal blocks of a 2-D map."""
    rows = np.array_split(np.arange(grid.shape[0]), cells)
    cols = np.array_split(np.arange(grid.shape[1]), cells)
    return np.array([[grid[np.ix_(r, c)].sum() for c in cols] for r in rows])
