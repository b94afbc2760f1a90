"""The models a server serves: opened from the store, decrypted into memory, ready or not.

A model that fails to open (wrong master key, changed bytes, invalid policy) is kept
as *not ready* with its reason; the other models still serve.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bentoml

from guarded_serving import vault
from guarded_serving.encoding import TabularEncoder, TensorEncoder, encoder_for
from guarded_serving.errors import (
    ArtifactError,
    ConfigError,
    GuardedServingError,
    InvalidInput,
    ModelUnavailable,
    UnknownModel,
)
from guarded_serving.explain import Explainer, select
from guarded_serving.guards.anomaly import AnomalyGuard, KNNAnomalyDetector
from guarded_serving.guards.schema import SchemaGuard
from guarded_serving.policy import Policy
from guarded_serving.runtimes import Runtime, load_runtime
from guarded_serving.wrap import ARTIFACT_FILE, MANIFEST_FILE, POLICY_FILE

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    """A decrypted model and everything fitted with it, all in memory."""

    name: str
    version: str
    policy: Policy
    runtime: Runtime
    encoder: TabularEncoder | TensorEncoder
    schema: SchemaGuard
    anomaly: AnomalyGuard
    explainer: Explainer
    manifest: dict[str, Any]

    def torch_module(self) -> Any | None:
        """The differentiable torch module behind the model, if it has one: the
        TorchScript model itself, or the module an ONNX model was exported from."""
        if self.runtime.kind == "torchscript":
            return self.runtime.module  # type: ignore[attr-defined]
        return getattr(self.explainer, "module", None)


@dataclass(slots=True)
class ModelStatus:
    tag: str
    name: str
    version: str | None = None
    ready: bool = False
    reason: str | None = None
    registered_at: datetime | None = None
    """When this version entered the model store; None when it is not there."""
    model: LoadedModel | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "ready": self.ready,
            "reason": self.reason,
        }


def open_model(tag: str | bentoml.Model, provider: vault.KeyProvider) -> LoadedModel:
    """Open a wrapped model from the BentoML store (by tag, or the store's entry
    itself), decrypting only into memory.

    Raises:
        ArtifactError: The master key is wrong or the artifact was changed.
        ConfigError: The sealed policy is invalid.
        bentoml.exceptions.NotFound: No such model in the store.
    """
    stored = tag if isinstance(tag, bentoml.Model) else bentoml.models.get(tag)
    name, version = stored.tag.name, stored.tag.version
    try:
        with open(stored.path_of(ARTIFACT_FILE), "rb") as fh:
            sealed = fh.read()
    except OSError:
        raise ArtifactError(
            f"model {name}:{version} has no readable {ARTIFACT_FILE}; wrap it with guarded-serving"
        ) from None
    files = vault.unpack(vault.open_sealed(sealed, name=name, version=version, provider=provider))
    policy = Policy.from_yaml_text(files[POLICY_FILE].decode(), source=f"{name}:{version} policy")
    manifest = json.loads(files[MANIFEST_FILE])
    encoder = encoder_for(policy)
    runtime = load_runtime(
        manifest["runtime"],
        files["model.bin"],
        encoder,
        manifest.get("output_space"),
        manifest.get("runtime_options"),
    )
    return LoadedModel(
        name=name,
        version=version,
        policy=policy,
        runtime=runtime,
        encoder=encoder,
        schema=SchemaGuard(policy, encoder),
        anomaly=AnomalyGuard(
            KNNAnomalyDetector.from_bytes(files["anomaly.npz"]), policy.guards.anomaly
        ),
        explainer=select.build(manifest["explainer"], runtime, encoder, policy, files),
        manifest=manifest,
    )


def tags_with_label(label: str) -> list[str]:
    """The newest version of every stored model carrying ``key=value`` as a label.

    Raises:
        ConfigError: ``label`` is not of the form ``key=value``.
    """
    key, sep, value = label.partition("=")
    if not sep or not key:
        raise ConfigError(f"model_label must look like key=value (got {label!r})")
    newest: dict[str, Any] = {}
    for model in bentoml.models.list():
        if model.info.labels.get(key) != value:
            continue
        name = model.tag.name
        if name not in newest or model.info.creation_time > newest[name].info.creation_time:
            newest[name] = model
    return sorted(str(m.tag) for m in newest.values())


class ModelRegistry:
    """Load every configured model once; route requests by name (and version).

    Several versions of one model may be served side by side (say a standard and a
    hardened network). A request that names a version gets exactly that one; a
    request that names only the model gets the default version: the newest one
    configured, by the time it was registered in the store. When that one failed to
    load, such requests get ``model_unavailable`` rather than an older version.

    Raises:
        ConfigError: A tag is malformed, or a version is listed more than once.
    """

    def __init__(self, tags: list[str], provider: vault.KeyProvider | None) -> None:
        self._statuses: list[ModelStatus] = []
        self._by_name: dict[str, list[ModelStatus]] = {}
        self._default: dict[str, ModelStatus] = {}
        for tag in tags:
            try:
                parsed = bentoml.Tag.from_taglike(tag)
            except ValueError:
                raise ConfigError(f"models: {tag!r} is not a valid BentoML model tag") from None
            status = ModelStatus(tag=tag, name=parsed.name)
            self._statuses.append(status)
            self._by_name.setdefault(parsed.name, []).append(status)
            try:
                stored = bentoml.models.get(parsed)
            except bentoml.exceptions.NotFound:
                status.reason = "not found in the model store"
            except Exception as exc:  # noqa: BLE001 - an unreadable entry must not stop the rest
                status.reason = f"cannot be read from the model store ({exc.__class__.__name__})"
            else:
                status.version = stored.tag.version
                status.registered_at = stored.info.creation_time
                _refuse_repeats(self._by_name[parsed.name], status)
                self._open(status, stored, provider)
            if not status.ready:
                logger.error(
                    "model %s not ready: %s", tag, status.reason, extra={"event": "model.failed"}
                )
        for name, versions in self._by_name.items():
            self._default[name] = _newest(versions)

    @staticmethod
    def _open(
        status: ModelStatus, stored: bentoml.Model, provider: vault.KeyProvider | None
    ) -> None:
        if provider is None:
            status.reason = "no master key configured"
            return
        try:
            model = open_model(stored, provider)
        except GuardedServingError as exc:
            status.reason = exc.message
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the rest
            status.reason = f"cannot be loaded ({exc.__class__.__name__})"
            logger.exception(
                "model %s failed to load", status.tag, extra={"event": "model.failed"}
            )
        else:
            status.model, status.ready = model, True
            logger.info(
                "model %s:%s ready", status.name, model.version, extra={"event": "model.ready"}
            )

    def statuses(self) -> list[ModelStatus]:
        return list(self._statuses)

    @property
    def all_ready(self) -> bool:
        return all(s.ready for s in self._statuses)

    def loaded(self) -> dict[str, LoadedModel]:
        """The default version of each model name, where it loaded."""
        return {n: s.model for n, s in self._default.items() if s.model is not None}

    def get(self, name: Any, version: Any = None) -> LoadedModel:
        """Resolve a request's model; the only served model when ``name`` is omitted.

        Raises:
            InvalidInput: ``name`` or ``version`` is not a string, or ``name`` is
                omitted while several models are served.
            UnknownModel: No such model (or version) is served.
            ModelUnavailable: It is configured but failed to load.
        """
        for where, value in (("model", name), ("version", version)):
            if value is not None and not isinstance(value, str):
                raise InvalidInput(where, "wrong_type", "expected a string")
        if name is None and len(self._by_name) == 1:
            name = next(iter(self._by_name))
        elif name is None:
            raise InvalidInput("model", "missing_field", "required: this server serves several")
        elif name not in self._by_name:
            raise UnknownModel("no such model is served", field="model")
        if version is None:
            status = self._default[name]
        else:
            matches = [s for s in self._by_name[name] if s.version == version]
            if not matches:
                raise UnknownModel("no such model version is served", field="version")
            status = matches[0]
        if status.model is None:
            raise ModelUnavailable("the model is not ready", field="model")
        return status.model


def _newest(versions: list[ModelStatus]) -> ModelStatus:
    """The version registered last; among equals (or unknowns), the one listed last."""
    oldest = datetime.min.replace(tzinfo=UTC)
    # max() keeps the first of equals, so search from the end of the list.
    return max(reversed(versions), key=lambda s: s.registered_at or oldest)


def _refuse_repeats(versions: list[ModelStatus], status: ModelStatus) -> None:
    """Refuse a version already listed, perhaps under another tag (``name:latest``).

    Raises:
        ConfigError: ``status`` resolves to a version listed before it.
    """
    for other in versions:
        if other is not status and other.version == status.version:
            raise ConfigError(
                f"models: {status.name}:{status.version} is listed more than once "
                f"(as {other.tag!r} and {status.tag!r})"
            )
