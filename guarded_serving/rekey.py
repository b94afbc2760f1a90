"""Move wrapped models in the BentoML store to a new master key (key rotation).

Part of the vault: for each model, only the artifact's data key is unwrapped with the
old master key and wrapped with the new one (:func:`guarded_serving.vault.rewrap`);
the payload is neither decrypted nor re-encrypted, so no plaintext exists at any point,
not even in memory. The new artifact is written beside the old one and moved over it
in one step. The readable ``manifest.json`` gets the new ``key_id`` and
``artifact_sha256``, and the BentoML model metadata the new ``key_id``.

The manifest sealed inside the artifact keeps the ``key_id`` the model was wrapped
with: it records the wrap, and nothing reads a key from it (the server finds the key
that wraps an artifact in the artifact's header).

Known limitations: a server that is running keeps the model it decrypted at start-up;
it needs the new key when it next starts. Bentos built before the rotation hold the
old artifact and still need the old key. The artifact's SHA-256 changes with its
header, so anything bound to that hash (a trust report) names the old bytes; the
payload ciphertext, which does not change, is the part to bind across rotations.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

from guarded_serving import vault
from guarded_serving.errors import ArtifactError, ConfigError, WrongMasterKey
from guarded_serving.files import replace_file
from guarded_serving.wrap import ARTIFACT_FILE, MANIFEST_FILE, STORE_LABEL

logger = logging.getLogger(__name__)

__all__ = ["RekeyOutcome", "RekeyResult", "rekey_model", "rekey_store"]

_MODEL_INFO_FILE = "model.yaml"


class RekeyOutcome(enum.StrEnum):
    """What happened to one model."""

    REKEYED = "rekeyed"
    """Its data key is now wrapped by the new master key."""
    SKIPPED = "skipped"
    """It was already under the new master key; nothing changed."""
    FAILED = "failed"
    """It was left as it was; ``reason`` says why."""


@dataclass(frozen=True, slots=True)
class RekeyResult:
    """The outcome for one model."""

    tag: str
    """The model, ``name:version`` (or the name asked for, when it was not found)."""
    outcome: RekeyOutcome
    old_key_id: str | None
    """The key the artifact named before, when its header could be read."""
    new_key_id: str
    """The key it was to be moved to."""
    reason: str | None = None
    """Why it was skipped or failed."""


def rekey_store(
    old: vault.KeyProvider, new: vault.KeyProvider, names: Sequence[str] | None = None
) -> list[RekeyResult]:
    """Move guarded-serving models in the BentoML store to a new master key.

    A model that fails is reported and left as it was; the others go on.

    Args:
        old: Unwraps the data keys the artifacts hold now.
        new: Wraps them for the rewritten artifacts.
        names: Model names (every version) or ``name:version`` tags; every model
            labelled ``guarded-serving`` when omitted.

    Returns:
        One result per model, in store order; a name that matched nothing gives a
        failed result under that name.
    """
    new_key_id = new.key_id
    results: list[RekeyResult] = []
    for tag, stored in _select(names):
        if isinstance(stored, str):
            results.append(RekeyResult(tag, RekeyOutcome.FAILED, None, new_key_id, stored))
        else:
            results.append(rekey_model(stored, old, new))
    return results


def rekey_model(
    stored: bentoml.Model, old: vault.KeyProvider, new: vault.KeyProvider
) -> RekeyResult:
    """Move one stored model to a new master key; see :func:`rekey_store`.

    Args:
        stored: The model, from ``bentoml.models.get``.
        old: Unwraps the data key the artifact holds now.
        new: Wraps it for the rewritten artifact.

    Returns:
        The outcome; failures are reported in it, not raised.
    """
    tag, name, version = str(stored.tag), stored.tag.name, stored.tag.version
    new_key_id = new.key_id
    artifact = Path(stored.path_of(ARTIFACT_FILE))
    try:
        sealed = artifact.read_bytes()
    except OSError:
        return RekeyResult(
            tag, RekeyOutcome.FAILED, None, new_key_id, f"it has no readable {ARTIFACT_FILE}"
        )
    try:
        header = vault.read_header(sealed, name=name, version=version)
    except ArtifactError as exc:
        return RekeyResult(tag, RekeyOutcome.FAILED, None, new_key_id, exc.message)
    old_key_id = header.key_id

    if old_key_id == new_key_id:
        # A run interrupted after the artifact moved may have left the readable copies
        # behind; bring them up to date.
        _record(stored, sealed, new_key_id)
        return RekeyResult(
            tag,
            RekeyOutcome.SKIPPED,
            old_key_id,
            new_key_id,
            f"already under master key {new_key_id}",
        )

    try:
        rewrapped = vault.rewrap(sealed, name=name, version=version, old=old, new=new)
    except WrongMasterKey:
        reason = f"it is sealed with master key {old_key_id}, not the old key {old.key_id}"
        return RekeyResult(tag, RekeyOutcome.FAILED, old_key_id, new_key_id, reason)
    except (ArtifactError, ConfigError) as exc:
        return RekeyResult(tag, RekeyOutcome.FAILED, old_key_id, new_key_id, exc.message)

    try:
        _replace(artifact, rewrapped)
    except OSError as exc:
        reason = f"{ARTIFACT_FILE} cannot be written ({exc.strerror or 'error'})"
        return RekeyResult(tag, RekeyOutcome.FAILED, old_key_id, new_key_id, reason)
    # vault.rewrap logged the rotation; the readable copies follow the artifact.
    _record(stored, rewrapped, new_key_id)
    return RekeyResult(tag, RekeyOutcome.REKEYED, old_key_id, new_key_id)


def _select(names: Sequence[str] | None) -> Iterator[tuple[str, bentoml.Model | str]]:
    """The models to rekey, each once; for a name that matched nothing, the reason."""
    if names is None:
        for stored in bentoml.models.list():
            if stored.info.labels.get(STORE_LABEL) is not None:
                yield str(stored.tag), stored
        return

    seen: set[str] = set()
    for name in names:
        try:
            found = [bentoml.models.get(name)] if ":" in name else bentoml.models.list(name)
        except bentoml.exceptions.NotFound:
            found = []
        except (bentoml.exceptions.BentoMLException, ValueError):
            yield name, "not a valid model name or tag"
            continue
        if not found:
            yield name, "not found in the model store"
        for stored in found:
            if str(stored.tag) not in seen:
                seen.add(str(stored.tag))
                yield str(stored.tag), stored


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` in one step, keeping its mode."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    replace_file(path, data, mode)


def _record(stored: bentoml.Model, sealed: bytes, key_id: str) -> None:
    """Bring the readable manifest and the BentoML metadata up to date with the artifact.

    Both are copies for people and tools; a failure here is logged, not raised, since
    the artifact itself is already in place.
    """
    try:
        _record_manifest(str(stored.tag), Path(stored.path_of(MANIFEST_FILE)), sealed, key_id)
        metadata = stored.info.metadata
        if "key_id" in metadata and metadata["key_id"] != key_id:
            metadata["key_id"] = key_id
            buffer = io.StringIO()
            stored.info.dump(buffer)
            _replace(Path(stored.path_of(_MODEL_INFO_FILE)), buffer.getvalue().encode("utf-8"))
    except OSError as exc:
        logger.warning(
            "model %s: the readable manifest or metadata cannot be updated (%s)",
            stored.tag,
            exc.strerror or "error",
            extra={"event": "model.rekey_record_failed"},
        )


def _record_manifest(tag: str, path: Path, sealed: bytes, key_id: str) -> None:
    digest = hashlib.sha256(sealed).hexdigest()
    try:
        manifest: Any = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        logger.warning(
            "model %s has no readable %s to update",
            tag,
            MANIFEST_FILE,
            extra={"event": "model.rekey_manifest_missing"},
        )
        return
    if (manifest.get("key_id"), manifest.get("artifact_sha256")) != (key_id, digest):
        manifest.update({"key_id": key_id, "artifact_sha256": digest})
        _replace(path, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
