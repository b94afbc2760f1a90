"""The server core every transport shares: models, pipeline, fairness and telemetry.

Transports decode a request into plain Python values, call one method here and encode
the :class:`Reply`. Nothing here knows about HTTP frameworks.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from guarded_serving import vault
from guarded_serving.errors import GuardedServingError, InvalidInput, InvalidInputs
from guarded_serving.fairness import (
    FairnessAccumulator,
    FairnessExporter,
    FairnessStore,
    LabelEvent,
)
from guarded_serving.guards.admit import AdmitStage
from guarded_serving.guards.identify import ApiKeyStore, IdentifyStage
from guarded_serving.pipeline import Pipeline, default_stages
from guarded_serving.registry import ModelRegistry
from guarded_serving.settings import GuardedServingSettings
from guarded_serving.telemetry import Telemetry
from guarded_serving.types import Outcome, ScoringRequest

logger = logging.getLogger(__name__)

MAX_FEEDBACK_LABELS = 10_000


@dataclass(slots=True)
class Reply:
    """A transport-neutral answer: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, exc: GuardedServingError, request_id: str) -> Reply:
        headers = {"X-Request-ID": request_id, **exc.headers()}
        return cls(exc.status_code, exc.to_dict(request_id), headers)


def resolve_key_provider(settings: GuardedServingSettings) -> vault.KeyProvider | None:
    """The master key: the environment variable if set, else the key file if present.

    Raises:
        ConfigError: The one that is set holds no valid key.
    """
    if os.environ.get(vault.DEFAULT_KEY_ENV_VAR, "").strip():
        return vault.EnvKeyProvider()
    if settings.master_key_file.exists():
        return vault.FileKeyProvider(settings.master_key_file)
    return None


class GuardedServer:
    """Serve every configured model through one guarded pipeline.

    Args:
        settings: Validated server settings.
        provider: Master key provider; resolved from settings when omitted.
    """

    def __init__(
        self, settings: GuardedServingSettings, provider: vault.KeyProvider | None = None
    ) -> None:
        self.settings = settings
        self.telemetry = Telemetry()
        self.registry = ModelRegistry(settings.models, provider or resolve_key_provider(settings))
        keys = (
            ApiKeyStore.from_file(settings.api_keys_file)
            if settings.api_keys_file is not None
            else ApiKeyStore()
        )
        if not keys and not settings.open_access:
            logger.warning("no API keys configured and open access is off: every request gets 401")
        self.identify = IdentifyStage(keys, open_access=settings.open_access)

        fairness = settings.fairness
        fairness.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.accumulator = FairnessAccumulator(
            FairnessStore(fairness.db_path),
            window_s=fairness.window_s,
            max_queue=fairness.max_queue,
        )
        self.accumulator.start()
        self.policies = {name: m.policy for name, m in self.registry.loaded().items()}
        self.exporter = FairnessExporter(self.accumulator, self.policies, self.telemetry.meter)
        self.pipeline = Pipeline(
            default_stages(self.identify, AdmitStage(), self.accumulator), self.telemetry
        )

    def close(self) -> None:
        self.accumulator.stop()
        self.accumulator.store.close()
        self.telemetry.shutdown()

    # -- requests ---------------------------------------------------------------------

    def predict(
        self,
        api_key: str | None,
        *,
        model: Any = None,
        version: Any = None,
        records: Any = None,
        context: Any = None,
        explain: Any = True,
    ) -> Reply:
        request_id = uuid.uuid4().hex
        try:
            # Authenticate before saying anything about which models exist.
            self.identify.identify(api_key)
            loaded = self.registry.get(model, version)
            request = ScoringRequest(
                request_id=request_id,
                model=loaded,
                api_key=api_key,
                raw_records=records,
                raw_context=context,
                raw_explain=explain,
            )
            self.pipeline.run(request)
        except GuardedServingError as exc:
            return Reply.error(exc, request_id)
        return Reply(200, _prediction_body(request), {"X-Request-ID": request_id})

    def feedback(self, api_key: str | None, *, model: Any = None, labels: Any = None) -> Reply:
        """Join true outcomes to earlier predictions by record id."""
        request_id = uuid.uuid4().hex
        try:
            self.identify.identify(api_key)
            loaded = self.registry.get(model)
            events = _label_events(labels, loaded.policy.output)
            result = self.accumulator.feedback(events)
        except GuardedServingError as exc:
            return Reply.error(exc, request_id)
        body = {
            "request_id": request_id,
            "accepted": result.accepted,
            "unknown_ids": list(result.unknown),
            "already_labelled_ids": list(result.already_labelled),
        }
        return Reply(200, body, {"X-Request-ID": request_id})

    def fairness(self, api_key: str | None, *, model: str | None = None) -> Reply:
        """Fairness figures per model, protected attribute and group, up to this call."""
        request_id = uuid.uuid4().hex
        try:
            self.identify.identify(api_key)
            if model is not None and model not in self.policies:
                self.registry.get(model)
        except GuardedServingError as exc:
            return Reply.error(exc, request_id)
        complete = self.accumulator.flush(timeout_s=2.0)
        report = self.accumulator.report(self.policies, model=model).to_dict()
        report["complete"] = complete
        report["dropped_events"] = self.accumulator.dropped
        return Reply(200, report, {"X-Request-ID": request_id})

    def readiness(self) -> list[dict[str, Any]]:
        return [status.to_dict() for status in self.registry.statuses()]


def _prediction_body(request: ScoringRequest) -> dict[str, Any]:
    model = request.model
    anomaly_policy = model.policy.guards.anomaly
    flagged_stages = [v.stage for v in request.verdicts if v.outcome is Outcome.FLAG]
    predictions = []
    for row, label in enumerate(request.labels):
        guards: dict[str, Any] = {}
        if request.anomaly_flags is not None:
            anomaly: dict[str, Any] = {
                "verdict": Outcome.FLAG.value if request.anomaly_flags[row] else Outcome.PASS.value
            }
            if anomaly_policy.expose_score:
                anomaly["score"] = round(float(request.anomaly_scores[row]), 6)
                anomaly["threshold"] = round(model.anomaly.detector.threshold_, 6)
            guards["anomaly"] = anomaly
        item: dict[str, Any] = {
            "id": request.record_id(row),
            "label": label,
            "probability": float(request.probabilities[row]),
            "guards": guards,
        }
        if request.explanations is not None:
            explanation = request.explanations[row]
            item["explanation"] = {
                "method": explanation.method,
                "output_space": explanation.output_space,
                "base_value": explanation.base_value,
                "margin": float(request.margins[row]),
                "attributions": explanation.attributions,
            }
        predictions.append(item)
    return {
        "request_id": request.request_id,
        "model": model.name,
        "version": model.version,
        "flagged": bool(flagged_stages),
        "predictions": predictions,
    }


def _label_events(labels: Any, output: Any) -> list[LabelEvent]:
    if not isinstance(labels, list) or not labels:
        raise InvalidInput("labels", "wrong_type", "expected a non-empty list of objects")
    if len(labels) > MAX_FEEDBACK_LABELS:
        raise InvalidInput(
            "labels", "too_many", f"at most {MAX_FEEDBACK_LABELS} labels per request"
        )
    allowed = (output.positive_label, output.negative_label)
    problems: list[InvalidInput] = []
    events: list[LabelEvent] = []
    for i, entry in enumerate(labels):
        where = f"labels[{i}]"
        if not isinstance(entry, dict):
            problems.append(InvalidInput(where, "wrong_type", "expected an object"))
            continue
        record_id, label = entry.get("id"), entry.get("label")
        if not isinstance(record_id, str) or not record_id:
            problems.append(InvalidInput(f"{where}.id", "wrong_type", "expected a record id"))
        elif label not in allowed or not isinstance(label, str):
            problems.append(
                InvalidInput(
                    f"{where}.label", "unknown_label", "expected one of the model's labels"
                )
            )
        else:
            events.append(LabelEvent(record_id, int(label == output.favourable)))
        if len(problems) >= 50:
            break
    if problems:
        raise InvalidInputs(problems)
    return events
