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

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from guarded_serving.encoding import TabularEncoder, TensorEncoder
from guarded_serving.explain.base import describe_background, explain_until, skipped
from guarded_serving.explain.maps import report_for
from guarded_serving.policy import GradientPolicy
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Explanation

METHOD = "integrated_gradients"
_CHUNK_VALUES = 2**17
"""Input values per backward pass."""


class IntegratedGradientsExplainer:
    """Attributions of a differentiable torch function of the model input.

    Args:
        forward: Maps float32 ``[N, *encoder.input_shape]`` to ``[N]`` scores.
        encoder: The policy's encoder.
        background: Background rows, flattened to ``[rows, columns]``.
        settings: Steps per path, and the time budget per request: rows left when it
            runs out are answered without attributions (``skipped_time_budget``).
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
        self.time_budget_ms = settings.time_budget_ms
        self.tolerance = tolerance
        self._report = report_for(encoder)
        self._background = torch.from_numpy(np.ascontiguousarray(background, dtype=np.float32))
        self.background = describe_background(background)
        with torch.no_grad():
            self._base = float(self.forward(self._background).double().mean())

    def column_attributions(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-column attributions and the logits of each row."""
        x = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        out = np.empty(x.shape, dtype=np.float64)
        for row in range(x.shape[0]):
            out[row] = self._attribute(x[row])
        return out, self._logits(x)

    def explain(self, inputs: ModelInput, deadline_s: float | None = None) -> list[Explanation]:
        x = torch.from_numpy(np.ascontiguousarray(inputs.matrix, dtype=np.float32))
        logits = self._logits(x)
        deadline = explain_until(self.time_budget_ms, deadline_s)
        details = {
            "background": self.background,
            "steps": self.steps,
            "time_budget_ms": self.time_budget_ms,
        }
        result = []
        for row in range(len(inputs)):
            if time.monotonic() > deadline:
                result.append(
                    skipped(METHOD, self._base, self.output_space, self.tolerance, details)
                )
                continue
            columns = self._attribute(x[row])
            gap = float(logits[row] - self._base - columns.sum())
            attributions, extra = self._report(columns)
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

    def _attribute(self, x: torch.Tensor) -> np.ndarray:
        """Integrated gradients of one flattened row ``[C]``, averaged over the background."""
        bg = self._background
        alphas = (torch.arange(self.steps, dtype=torch.float32) + 0.5) / self.steps
        delta = x - bg  # [B, C]
        points = bg[None, :, :] + alphas[:, None, None] * delta[None, :, :]  # [S, B, C]
        points = points.reshape(-1, x.shape[0])
        # Backward passes over about a hundred thousand values at a time: larger
        # batches only add memory traffic and run slower per point.
        chunk = max(1, _CHUNK_VALUES // x.shape[0])
        grads = []
        for start in range(0, points.shape[0], chunk):
            part = points[start : start + chunk].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.forward(part).sum(), part)
            grads.append(grad)
        mean_grad = torch.cat(grads).reshape(self.steps, bg.shape[0], -1).mean(dim=0)  # [B, C]
        return (mean_grad * delta).mean(dim=0).double().numpy()

    def _logits(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.forward(x).double().numpy()
