"""Budgeted KernelSHAP for any model: shap's KernelExplainer over feature codes.

Rows are coded one column per feature (the number, or the category's index), so a
missing feature is filled in from background rows feature by feature, categories
included. The efficiency constraint of KernelSHAP makes base value + attributions
equal the model's score; the sample count and the per-request time budget come from
the policy and are stated in every answer.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import numpy as np

from guarded_serving.encoding import TabularEncoder
from guarded_serving.explain.base import describe_background, explain_until, skipped
from guarded_serving.policy import KernelShapPolicy
from guarded_serving.runtimes.base import ModelInput, Runtime
from guarded_serving.types import Explanation

logger = logging.getLogger(__name__)

METHOD = "kernel_shap"
# The efficiency constraint is solved exactly; only float rounding remains.
TOLERANCE = 1e-6
_SEED = 0
_GLOBAL_RNG_LOCK = threading.Lock()


class KernelShapExplainer:
    """KernelSHAP in the runtime's own output space.

    Args:
        runtime: Any runtime.
        encoder: The policy's encoder.
        background: Background rows as feature codes (``encoder.to_codes``).
        budget: Sample count and time budget.
    """

    method = METHOD

    def __init__(
        self,
        runtime: Runtime,
        encoder: TabularEncoder,
        background: np.ndarray,
        budget: KernelShapPolicy,
    ) -> None:
        import shap

        self.runtime = runtime
        self.encoder = encoder
        self.budget = budget
        self.output_space = "log_odds" if runtime.output_space == "margin" else "probability"
        self._names = list(encoder.feature_columns)
        self._explainer = shap.KernelExplainer(self._score, background, link="identity")
        self.background = describe_background(background)
        self._base = float(np.asarray(self._explainer.expected_value).reshape(-1)[0])

    def _score(self, codes: np.ndarray) -> np.ndarray:
        inputs = ModelInput(self.encoder.from_codes(codes), self.encoder)
        return self.runtime.predict_score(inputs)

    def explain(self, inputs: ModelInput, deadline_s: float | None = None) -> list[Explanation]:
        codes = self.encoder.to_codes(inputs.records)
        deadline = explain_until(self.budget.time_budget_ms, deadline_s)
        details = {"samples": self.budget.samples, "background": self.background,
                   "time_budget_ms": self.budget.time_budget_ms}  # fmt: skip
        out: list[Explanation] = []
        for row in range(len(inputs)):
            if time.monotonic() > deadline:
                out.append(skipped(METHOD, self._base, self.output_space, TOLERANCE, details))
                continue
            values = self._shap_values(codes[row : row + 1])
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            out.append(
                Explanation(
                    method=METHOD,
                    base_value=self._base,
                    attributions=dict(zip(self._names, values.tolist(), strict=True)),
                    output_space=self.output_space,
                    tolerance=TOLERANCE,
                    details=details,
                )
            )
        return out

    def _shap_values(self, row: np.ndarray) -> np.ndarray:
        # shap draws its coalitions from numpy's global generator: seed it per row, so
        # the same row always gets the same attributions, and restore it afterwards.
        with _GLOBAL_RNG_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = np.random.get_state()
            np.random.seed(_SEED)
            try:
                return self._explainer.shap_values(row, nsamples=self.budget.samples, silent=True)
            finally:
                np.random.set_state(state)
