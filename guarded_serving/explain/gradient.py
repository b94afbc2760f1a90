"""Integrated gradients from a fixed background set, for differentiable torch models.

For each background row b, the gradient of the model's logit is averaged along the
straight path from b to the input x (midpoint rule, ``steps`` points) and multiplied
by (x - b); the attributions are the mean over the background rows. Completeness
holds up to the path integral's discretization: base value (the mean logit over the
background) + attributions = the input's logit, with the measured gap reported in
each answer. One-hot columns of a categorical feature are summed back into it; for
tensor inputs the answer is a map of the input's shape with a coarse summary (see
``explain/maps.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from guarded_serving.encoding import TabularEncoder, TensorEncoder
from guarded_serving.explain.base import describe_background
from guarded_serving.explain.maps import report_for
from guarded_serving.policy import GradientPolicy
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Explanation

METHOD = "integrated_gradients"


class IntegratedGradientsExplainer:
    """Attributions of a differentiable torch function of the model input.

    Args:
        forward: Maps float32 ``[N, *encoder.input_shape]`` to ``[N]`` scores.
        encoder: The policy's encoder.
        background: Background rows, flattened to ``[rows, columns]``.
        settings: Steps per path.
        tolerance: The completeness gap this model was verified to stay within when
            wrapped; stated in every answer.
        output_space: ``log_odds`` when ``forward`` returns logits, else ``probability``.
    """

    method = METHOD
    module: Any = None
    """The torch module behind ``forward``, when there is one (robustness audits)."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        encoder: TabularEncoder | TensorEncoder,
        background: np.ndarray,
        settings: GradientPolicy,
        tolerance: float,
        output_space: str = "log_odds",
    ) -> None:
        self.output_space = output_space
        self.encoder = encoder
        shape = tuple(encoder.input_shape)
        self.forward = lambda flat: forward(flat.reshape(-1, *shape))
        self.steps = settings.steps
        self.tolerance = tolerance
        self._report = report_for(encoder)
        self._background = torch.from_numpy(np.ascontiguousarray(background, dtype=np.float32))
        self.background = describe_background(background)
        with torch.no_grad():
            self._base = float(self.forward(self._background).double().mean())

    def column_attributions(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-column attributions and the logits of each row."""
        x = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        bg = self._background
        alphas = (torch.arange(self.steps, dtype=torch.float32) + 0.5) / self.steps
        out = np.empty(x.shape, dtype=np.float64)
        for row in range(x.shape[0]):
            delta = x[row] - bg  # [B, C]
            points = bg[None, :, :] + alphas[:, None, None] * delta[None, :, :]  # [S, B, C]
            points = points.reshape(-1, x.shape[1]).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.forward(points).sum(), points)
            mean_grad = grad.reshape(self.steps, bg.shape[0], -1).mean(dim=0)  # [B, C]
            out[row] = (mean_grad * delta).mean(dim=0).double().numpy()
        with torch.no_grad():
            logits = self.forward(x).double().numpy()
        return out, logits

    def explain(self, inputs: ModelInput) -> list[Explanation]:
        columns, logits = self.column_attributions(inputs.matrix)
        details = {
            "background_rows": self.background["rows"],
            "background": self.background,
            "steps": self.steps,
        }
        result = []
        for row in range(len(inputs)):
            gap = float(logits[row] - self._base - columns[row].sum())
            attributions, extra = self._report(columns[row])
            result.append(
                Explanation(
                    method=METHOD,
                    base_value=self._base,
                    attributions=attributions,
                    output_space=self.output_space,
                    tolerance=self.tolerance,
                    details={**details, **extra, "completeness_gap": gap},
                )
            )
        return result
