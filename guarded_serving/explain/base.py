"""What every explainer provides, and the request-path stage that calls it."""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from typing import Any, Protocol

import numpy as np
from opentelemetry.metrics import Counter

from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Explanation, ScoringRequest

logger = logging.getLogger(__name__)

FAILED = "failed"
"""Status of the rows of an explainer that raised."""
SKIPPED_TIME_BUDGET = "skipped_time_budget"
"""Status of the rows left when an explainer's time ran out."""


def skipped(
    method: str, base_value: float, output_space: str, tolerance: float, details: dict[str, Any]
) -> Explanation:
    """A row answered without attributions because the explainer's time ran out."""
    return Explanation(
        method=method,
        base_value=base_value,
        attributions={},
        output_space=output_space,
        tolerance=tolerance,
        details=details,
        status=SKIPPED_TIME_BUDGET,
    )


def explain_until(time_budget_ms: int, deadline_s: float | None) -> float:
    """The ``time.monotonic()`` instant an explainer stops at: its own budget from
    now, or the request's deadline if that comes first."""
    own = time.monotonic() + time_budget_ms / 1000.0
    return own if deadline_s is None else min(own, deadline_s)


class Explainer(Protocol):
    """Attributions per original feature for every row of a batch.

    ``deadline_s`` is a ``time.monotonic()`` instant after which an explainer with a
    time budget explains no more rows, whatever is left of its own budget; exact
    explainers, which cost about as much as a prediction, may ignore it.
    """

    method: str

    def explain(
        self, inputs: ModelInput, deadline_s: float | None = None
    ) -> list[Explanation]: ...


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
    """Stage 8: attach the model's explanations when the policy and request ask.

    An explainer that fails never fails the prediction: its rows are answered with
    ``status: "failed"`` and no attributions, the failure is logged as a warning and
    counted.

    Args:
        counter: Counts explained rows by model and status; none when omitted.
    """

    name = "explain"

    def __init__(self, counter: Counter | None = None) -> None:
        self.counter = counter

    def __call__(self, request: ScoringRequest) -> None:
        model = request.model
        if model.explainer is None or not model.policy.explanation.enabled or not request.explain:
            return
        try:
            explanations = model.explainer.explain(request.inputs, request.deadline_s)
        except Exception as exc:  # noqa: BLE001 - attributions must not cost the answer
            logger.warning(
                "explainer failed (%s); answering without attributions",
                exc.__class__.__name__,
                extra={"event": "explain.failed", "request_id": request.request_id},
            )
            failed = Explanation(method=model.explainer.method, base_value=0.0,
                                 attributions={}, status=FAILED)  # fmt: skip
            explanations = [failed] * len(request.inputs)
        request.explanations = explanations
        if self.counter is not None:
            for status, count in collections.Counter(e.status for e in explanations).items():
                self.counter.add(count, {"model": model.name, "status": status})
