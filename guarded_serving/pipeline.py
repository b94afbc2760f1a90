"""The request path: ordered stages, one span each; the first rejection wins.

Every transport (BentoML HTTP, and later others) builds a :class:`ScoringRequest` and
hands it to :meth:`Pipeline.run`. A stage either returns (its verdict, pass or flag,
recorded on the request) or raises a :class:`GuardedServingError` that ends the run.
Stages that belong to one model (schema, anomaly detector, explainer) are looked up on
the request's model, so one pipeline serves every model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from guarded_serving.errors import GuardedServingError
from guarded_serving.explain.base import ExplainStage
from guarded_serving.fairness import FairnessAccumulator, PredictionEvent
from guarded_serving.telemetry import Telemetry
from guarded_serving.types import Outcome, ScoringRequest, Verdict

logger = logging.getLogger(__name__)


class Stage(Protocol):
    name: str

    def __call__(self, request: ScoringRequest) -> None: ...


class ModelStage:
    """A stage whose implementation belongs to the request's model."""

    def __init__(self, name: str, pick: Callable[[ScoringRequest], Stage | None]) -> None:
        self.name = name
        self._pick = pick

    def __call__(self, request: ScoringRequest) -> None:
        stage = self._pick(request)
        if stage is not None:
            stage(request)


class PredictStage:
    """Stage 7, predict: margins, probabilities and labels from the decrypted model."""

    name = "predict"

    def __call__(self, request: ScoringRequest) -> None:
        output = request.model.policy.output
        runtime = request.model.runtime
        scores = runtime.predict_score(request.inputs)
        if runtime.output_space == "margin":
            probabilities = 1.0 / (1.0 + np.exp(-scores))
        else:
            probabilities = np.clip(scores, 0.0, 1.0)
        request.scores = scores
        request.probabilities = probabilities
        request.labels = [
            output.positive_label if p >= output.threshold else output.negative_label
            for p in probabilities
        ]


class RecordStage:
    """Stage 10, record: hand the outcome to the fairness accumulator without waiting."""

    name = "record"

    def __init__(self, accumulator: FairnessAccumulator | None) -> None:
        self.accumulator = accumulator

    def __call__(self, request: ScoringRequest) -> None:
        if self.accumulator is None:
            return
        favourable = request.model.policy.output.favourable
        event = PredictionEvent(
            model=request.model.name,
            version=request.model.version,
            request_id=request.request_id,
            timestamp_s=time.time(),
            record_ids=tuple(request.record_id(i) for i in range(len(request.labels))),
            predicted=tuple(int(label == favourable) for label in request.labels),
            groups=tuple(request.context),
        )
        # Never blocks and never raises; a full queue drops and counts the event.
        self.accumulator.record(event)


def _anomaly(request: ScoringRequest) -> Stage | None:
    return request.model.anomaly if request.model.policy.guards.anomaly.enabled else None


def default_stages(
    identify: Stage,
    admit: Stage,
    accumulator: FairnessAccumulator | None,
    telemetry: Telemetry | None = None,
) -> list[Stage]:
    """The stages in request-path order."""
    return [
        identify,
        admit,
        ModelStage("validate", lambda r: r.model.schema),
        ModelStage("anomaly", _anomaly),
        PredictStage(),
        ExplainStage(telemetry.explanations if telemetry is not None else None),
        RecordStage(accumulator),
    ]


def _parent_context() -> Context | None:
    """Join the transport's trace when it is sampled; otherwise start a new trace.

    BentoML opens an HTTP span for every request, unsampled unless its own tracing is
    configured; a parent-based sampler would then drop all of our spans with it.
    """
    parent = trace.get_current_span().get_span_context()
    if parent.is_valid and parent.trace_flags.sampled:
        return None
    return Context()


class Pipeline:
    """Run the stages in order under one request span, with one child span per stage."""

    def __init__(self, stages: Sequence[Stage], telemetry: Telemetry) -> None:
        self.stages = list(stages)
        self.telemetry = telemetry

    def run(self, request: ScoringRequest) -> ScoringRequest:
        """Run every stage; raises the first stage's rejection as is."""
        tracer = self.telemetry.tracer
        started = time.perf_counter()
        outcome = "served"
        with tracer.start_as_current_span(
            "guarded_serving.request",
            context=_parent_context(),
            kind=trace.SpanKind.INTERNAL,
            attributes={"guarded_serving.model": request.model.name,
                        "guarded_serving.model_version": request.model.version,
                        "guarded_serving.request_id": request.request_id},
        ) as root:  # fmt: skip
            try:
                for stage in self.stages:
                    self._run_stage(stage, request)
            except GuardedServingError as exc:
                outcome = "rejected"
                root.set_attribute("guarded_serving.error_code", exc.code)
                root.set_status(Status(StatusCode.ERROR, exc.code))
                raise
            finally:
                flagged = any(v.outcome is Outcome.FLAG for v in request.verdicts)
                if outcome == "served" and flagged:
                    outcome = "flagged"
                root.set_attribute("guarded_serving.outcome", outcome)
                root.set_attribute("guarded_serving.rows", len(request.labels))
                self.telemetry.count_request(
                    {"model": request.model.name, "outcome": outcome},
                    len(request.labels),
                    time.perf_counter() - started,
                )
        return request

    def _run_stage(self, stage: Stage, request: ScoringRequest) -> None:
        seen = len(request.verdicts)
        with self.telemetry.tracer.start_as_current_span(
            f"guarded_serving.stage.{stage.name}",
            attributes={"guarded_serving.stage": stage.name},
        ) as span:
            try:
                stage(request)
            except GuardedServingError as exc:
                span.set_attribute("guarded_serving.verdict", Outcome.REJECT.value)
                span.set_attribute("guarded_serving.error_code", exc.code)
                span.set_status(Status(StatusCode.ERROR, exc.code))
                self._count(stage.name, Outcome.REJECT)
                raise
            verdicts: list[Verdict] = request.verdicts[seen:]
            outcome = verdicts[-1].outcome if verdicts else Outcome.PASS
            span.set_attribute("guarded_serving.verdict", outcome.value)
            self._count(stage.name, outcome)

    def _count(self, stage: str, outcome: Outcome) -> None:
        self.telemetry.verdicts.add(1, {"stage": stage, "outcome": outcome.value})
