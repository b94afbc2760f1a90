"""Wrap a trained model: fit its guards, seal everything, register it in BentoML's store.

This is the one way a model enters the server. The reference recipes train a model
and then call :func:`wrap_model` exactly as a user's model is wrapped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import bentoml
import numpy as np
import pandas as pd

from guarded_serving import vault
from guarded_serving.encoding import TabularEncoder
from guarded_serving.guards.anomaly import KNNAnomalyDetector
from guarded_serving.policy import Policy

logger = logging.getLogger(__name__)

ARTIFACT_FILE = "artifact.sealed"
POLICY_FILE = "policy.yaml"
MANIFEST_FILE = "manifest.json"
STORE_LABEL = "guarded-serving"
_LIBRARIES = ("guarded-serving", "xgboost", "numpy", "scikit-learn", "bentoml")


@dataclass(frozen=True)
class WrapResult:
    tag: str
    """The registered model, ``name:version``."""
    manifest: dict[str, Any]
    """Hashes, library versions, evaluation and calibration figures."""


def wrap_model(
    *,
    policy: Policy,
    runtime: str,
    model_bytes: bytes,
    train: pd.DataFrame,
    calibration: pd.DataFrame,
    provider: vault.KeyProvider,
    figures: Mapping[str, Any] | None = None,
    holdout: pd.DataFrame | None = None,
) -> WrapResult:
    """Fit the guards, seal model and guards together, and register the result.

    Args:
        policy: The model's validated policy.
        runtime: Runtime kind of ``model_bytes`` (``xgboost``).
        model_bytes: The serialized model.
        train: Training rows (policy features as columns): the anomaly reference.
        calibration: Held-out in-distribution rows that set the guard thresholds.
        provider: Master key provider that wraps the artifact's data key.
        figures: Evaluation figures to keep in the manifest (test AUC and the like).
        holdout: Optional test rows on which the guards' flag rates are measured and
            recorded in the manifest.

    Returns:
        The registered tag (``policy.model:version``) and the manifest.
    """
    encoder = TabularEncoder(policy)
    train_matrix = encoder.encode(train[policy.feature_names].to_dict("records"))
    calibration_matrix = encoder.encode(calibration[policy.feature_names].to_dict("records"))

    anomaly = policy.guards.anomaly
    detector = KNNAnomalyDetector(neighbours=anomaly.neighbours).fit(
        train_matrix, encoder.numeric_mask
    )
    detector.calibrate(calibration_matrix, anomaly.target_fpr)
    holdout_rate = None
    if holdout is not None:
        holdout_matrix = encoder.encode(holdout[policy.feature_names].to_dict("records"))
        holdout_rate = float(np.mean(detector.score(holdout_matrix) > detector.threshold_))

    with bentoml.models.create(policy.model, labels={STORE_LABEL: "true"}) as model:
        version = model.tag.version
        manifest = {
            "format": 1,
            "name": policy.model,
            "version": version,
            "runtime": runtime,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "key_id": provider.key_id,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "libraries": _library_versions(),
            "figures": dict(figures or {}),
            "calibration": {
                "anomaly": {
                    "method": "knn_distance",
                    "neighbours": detector.neighbours,
                    "threshold": detector.threshold_,
                    "target_fpr": detector.target_fpr_,
                    "calibration_rows": detector.calibration_rows_,
                    "calibration_fpr": detector.calibration_fpr_,
                    "reference_rows": int(detector.reference_.shape[0]),
                    "holdout_flag_rate": holdout_rate,
                }
            },
        }
        policy_text = policy.to_yaml_text()
        plaintext = vault.pack(
            {
                "model.bin": model_bytes,
                "anomaly.npz": detector.to_bytes(),
                POLICY_FILE: policy_text.encode(),
                MANIFEST_FILE: json.dumps(manifest, sort_keys=True).encode(),
            }
        )
        sealed = vault.seal(plaintext, name=policy.model, version=version, provider=provider)
        manifest["artifact_sha256"] = hashlib.sha256(sealed).hexdigest()
        with open(model.path_of(ARTIFACT_FILE), "wb") as fh:
            fh.write(sealed)
        # Readable copies for operators; the server trusts only the sealed ones.
        with open(model.path_of(POLICY_FILE), "w", encoding="utf-8") as fh:
            fh.write(policy_text)
        with open(model.path_of(MANIFEST_FILE), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
        model.info.metadata.update({"runtime": runtime, "key_id": provider.key_id, "format": 1})
    logger.info("registered %s", model.tag, extra={"event": "model.registered"})
    return WrapResult(tag=str(model.tag), manifest=manifest)


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions
