"""What every explainer provides, and the request-path stage that calls it."""

from __future__ import annotations

from typing import Protocol

from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Explanation, ScoringRequest


class Explainer(Protocol):
    """Attributions per original feature for every row of a batch."""

    method: str

    def explain(self, inputs: ModelInput) -> list[Explanation]: ...


class ExplainStage:
    """Stage 8: attach the model's explanations when the policy and request ask."""

    name = "explain"

    def __call__(self, request: ScoringRequest) -> None:
        model = request.model
        if model.explainer is None or not model.policy.explanation.enabled or not request.explain:
            return
        request.explanations = model.explainer.explain(request.inputs)
