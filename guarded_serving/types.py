"""Shared request-path types: the request context each stage reads and fills in."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from guarded_serving.registry import LoadedModel
    from guarded_serving.runtimes.base import ModelInput

JSONObject = dict[str, Any]


class Outcome(enum.StrEnum):
    """A stage's verdict: served as is, served but marked, or refused."""

    PASS = "pass"
    FLAG = "flag"
    REJECT = "reject"


@dataclass(slots=True)
class Verdict:
    stage: str
    outcome: Outcome
    code: str | None = None


@dataclass(slots=True)
class Explanation:
    """Attributions of one row per original feature: base value + sum = model output.

    ``output_space`` says which output (``log_odds`` or ``probability``), and
    ``tolerance`` how closely the sum is guaranteed to match it.
    """

    method: str
    base_value: float
    attributions: dict[str, float]
    output_space: str = "log_odds"
    tolerance: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"


@dataclass(slots=True)
class ScoringRequest:
    """One call to score a batch of rows against one model, as it moves down the pipeline.

    The transport fills the raw fields; each stage reads what earlier stages left and
    adds its own results.
    """

    request_id: str
    model: LoadedModel
    api_key: str | None
    raw_records: Any
    raw_context: Any = None
    raw_explain: Any = True

    client_id: str | None = None
    client_rows_per_window: int | None = None
    records: list[JSONObject] = field(default_factory=list)
    context: list[dict[str, str]] = field(default_factory=list)
    explain: bool = True
    inputs: ModelInput | None = None
    anomaly_scores: np.ndarray | None = None
    anomaly_flags: np.ndarray | None = None
    scores: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)
    explanations: list[Explanation] | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    deadline_s: float | None = None
    """``time.monotonic()`` instant by which explaining must stop, when the transport
    sets one (it counts the time the request waited before it reached the pipeline)."""

    @property
    def n_rows(self) -> int:
        return len(self.raw_records) if isinstance(self.raw_records, list) else 1

    def record_id(self, row: int) -> str:
        return f"{self.request_id}-{row}"
