"""The server core every transport shares: models, pipeline, fairness and telemetry.

Transports decode a request into plain Python values, call one method here and encode
the :class:`Reply`. Nothing here knows about HTTP frameworks.
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from guarded_serving import vault
from guarded_serving.errors import GuardedServingError, InvalidInput, InvalidInputs
from guarded_serving.explain.base import FAILED
from guarded_serving.fairness import (
    FairnessAccumulator,
    FairnessExporter,
    FairnessStore,
    LabelEvent,
)
from guarded_serving.guards.admit import AdmitStage
from guarded_serving.guards.identify import ApiKeyStore, IdentifyStage
from guarded_serving.pipeline import Pipeline, default_stages
from guarded_serving.registry import LoadedModel, ModelRegistry, tags_with_label
from guarded_serving.settings import GuardedServingSettings
from guarded_serving.telemetry import Telemetry
from guarded_serving.types import Explanation, Outcome, ScoringRequest

logger = logging.getLogger(__name__)

MAX_FEEDBACK_LABELS = 10_000
# A record id as /predict hands it out: the request id, a dash, the row number.
_RECORD_ID = re.compile(r"[0-9a-f]{32}-[0-9]{1,6}")


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
    """The master key provider, from the first of these that is set.

    ``settings.master_key_uri`` (see :func:`vault.provider_from_uri`), then the
    ``GUARDED_SERVING_MASTER_KEY`` environment variable, then the key file
    ``settings.master_key_file`` if it exists. None when there is none of them.

    Raises:
        ConfigError: The one that is set holds no valid key, or the provider it names
            cannot be reached.
    """
    uri = (settings.master_key_uri or "").strip()
    if uri:
        return vault.provider_from_uri(uri)
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
        tags = tags_with_label(settings.model_label) if settings.model_label else settings.models
        self.registry = ModelRegistry(tags, provider or resolve_key_provider(settings))
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
            default_stages(self.identify, AdmitStage(), self.accumulator, self.telemetry),
            self.telemetry,
        )

    @property
    def ready(self) -> bool:
        statuses = [s.ready for s in self.registry.statuses()]
        if self.settings.ready_when == "any":
            return any(statuses)
        return all(statuses)

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
        unexpected: InvalidInputs | None = None,
        deadline_s: float | None = None,
    ) -> Reply:
        """Score a batch. ``unexpected`` carries body fields the transport did not know;
        ``deadline_s`` is when explaining must stop (see ``ScoringRequest.deadline_s``)."""
        request_id = uuid.uuid4().hex
        try:
            # Authenticate before saying anything about which models exist.
            self.identify.identify(api_key)
            if unexpected is not None:
                raise unexpected
            loaded = self.registry.get(model, version)
            request = ScoringRequest(
                request_id=request_id,
                model=loaded,
                api_key=api_key,
                raw_records=records,
                raw_context=context,
                raw_explain=explain,
                deadline_s=deadline_s,
            )
            self.pipeline.run(request)
        except GuardedServingError as exc:
            return Reply.error(exc, request_id)
        return Reply(200, _prediction_body(request), {"X-Request-ID": request_id})

    def feedback(
        self,
        api_key: str | None,
        *,
        model: Any = None,
        labels: Any = None,
        unexpected: InvalidInputs | None = None,
    ) -> Reply:
        """Join true outcomes to earlier predictions by record id."""
        request_id = uuid.uuid4().hex
        try:
            self.identify.identify(api_key)
            if unexpected is not None:
                raise unexpected
            loaded = self.registry.get(model)
            events = _label_events(labels, loaded)
            result = self.accumulator.feedback(events)
        except GuardedServingError as exc:
            return Reply.error(exc, request_id)
        body = {
            "request_id": request_id,
            "accepted": result.accepted,
            "unknown_ids": list(dict.fromkeys(result.unknown)),
            "already_labelled_ids": list(dict.fromkeys(result.already_labelled)),
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
        report = self.accumulator.report(self.policies, model=model, known_only=True).to_dict()
        accumulator = self.accumulator
        report["request_id"] = request_id
        report["complete"] = complete and not (accumulator.failed or accumulator.invalid)
        report["dropped_events"] = accumulator.dropped
        report["failed_events"] = accumulator.failed + accumulator.invalid
        return Reply(200, report, {"X-Request-ID": request_id})

    def models(self, api_key: str | None) -> Reply:
        """Each configured model's readiness, with the reason when it is not ready."""
        request_id = uuid.uuid4().hex
        try:
            self.identify.identify(api_key)
        except GuardedServingError as exc:
            return Reply.error(exc, request_id)
        statuses = [status.to_dict() for status in self.registry.statuses()]
        ready = all(s["ready"] for s in statuses)
        body = {"ready": ready, "models": statuses, "request_id": request_id}
        return Reply(200 if ready else 503, body, {"X-Request-ID": request_id})


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
            item["explanation"] = _explanation_body(
                request.explanations[row],
                float(request.scores[row]),
                model.runtime.output_space,
            )
        predictions.append(item)
    return {
        "request_id": request.request_id,
        "model": model.name,
        "version": model.version,
        "flagged": bool(flagged_stages),
        "predictions": predictions,
    }


def _explanation_body(explanation: Explanation, score: float, score_space: str) -> dict[str, Any]:
    if explanation.status == FAILED:
        return {"method": explanation.method, "status": explanation.status}
    body: dict[str, Any] = {
        "method": explanation.method,
        "status": explanation.status,
        "output_space": explanation.output_space,
        "base_value": explanation.base_value,
        # The model output, in the explanation's space, that base + attributions equal.
        "output": _in_space(score, score_space, explanation.output_space),
        "tolerance": explanation.tolerance,
        "attributions": explanation.attributions,
    }
    body.update(explanation.details)
    return body


def _in_space(score: float, score_space: str, space: str) -> float:
    """The model's score (a margin or a probability) in the explanation's space."""
    if score_space == "margin":
        return score if space == "log_odds" else 1.0 / (1.0 + math.exp(-score))
    if space == "probability":
        return score
    clipped = min(max(score, 1e-300), 1.0 - 1e-16)
    return math.log(clipped) - math.log1p(-clipped)


def _label_events(labels: Any, model: LoadedModel) -> list[LabelEvent]:
    if labels is None:
        raise InvalidInput("labels", "missing_field", "required")
    if not isinstance(labels, list):
        raise InvalidInput("labels", "wrong_type", "expected a list of objects")
    if not labels:
        raise InvalidInput("labels", "empty", "expected at least one label")
    if len(labels) > MAX_FEEDBACK_LABELS:
        raise InvalidInput(
            "labels", "too_many", f"at most {MAX_FEEDBACK_LABELS} labels per request"
        )
    output = model.policy.output
    allowed = (output.positive_label, output.negative_label)
    problems: list[InvalidInput] = []
    events: list[LabelEvent] = []
    for i, entry in enumerate(labels):
        where = f"labels[{i}]"
        if not isinstance(entry, dict):
            problems.append(InvalidInput(where, "wrong_type", "expected an object"))
            continue
        record_id, label = entry.get("id"), entry.get("label")
        missing = [k for k in ("id", "label") if entry.get(k) is None]
        extra = [k for k in entry if k not in ("id", "label")]
        if missing:
            problems.extend(
                InvalidInput(f"{where}.{k}", "missing_field", "required") for k in missing
            )
        elif extra:
            problems.append(
                InvalidInput(where, "unexpected_field", "a label takes only id and label")
            )
        elif not isinstance(record_id, str) or not _RECORD_ID.fullmatch(record_id):
            problems.append(
                InvalidInput(f"{where}.id", "wrong_type", "expected a record id from /predict")
            )
        elif label not in allowed or not isinstance(label, str):
            problems.append(
                InvalidInput(
                    f"{where}.label", "unknown_label", "expected one of the model's labels"
                )
            )
        else:
            events.append(LabelEvent(record_id, int(label == output.favourable), model.name))
        if len(problems) >= 50:
            break
    if problems:
        raise InvalidInputs(problems)
    return events
