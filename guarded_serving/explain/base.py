"""What every explainer provides, and the request-path stage that calls it."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np

from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Explanation, ScoringRequest


class Explainer(Protocol):
    """Attributions per original feature for every row of a batch."""

    method: str

    def explain(self, inputs: ModelInput) -> list[Explanation]: ...


def describe_background(background: np.ndarray) -> dict[str, Any]:
    """How an answer names the background set it was explained against.

    The rows are a seeded sample of the training data given to ``wrap``, fixed
    in the sealed artifact; the fingerprint (SHA-256 of the rows as contiguous
    float64) matches the one the manifest records for the explainer.
    """
    rows = np.ascontiguousarray(background, dtype=np.float64)
    return {
        "rows": int(rows.shape[0]),
        "drawn_from": "training data given to wrap",
        "sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
    }


class ExplainStage:
    """Stage 8: attach the model's explanations when the policy and request ask."""

    name = "explain"

    def __call__(self, request: ScoringRequest) -> None:
        model = request.model
        if model.explainer is None or not model.policy.explanation.enabled or not request.explain:
            return
        request.explanations = model.explainer.explain(request.inputs)
