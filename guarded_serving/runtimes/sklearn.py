"""scikit-learn runtime: a fitted classifier or pipeline taking the raw data frame.

The model arrives as skops bytes (preferred: loading runs no arbitrary code, and only
the types recorded as trusted when the model was wrapped are allowed) or as joblib
bytes (a pickle: acceptable only because the artifact is sealed and authenticated,
so the bytes are exactly those the operator wrapped).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from guarded_serving.encoding import TabularEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.runtimes.base import ModelInput


class SklearnRuntime:
    """A classifier with ``predict_proba`` over the policy's raw features."""

    kind = "sklearn"
    output_space = "probability"

    def __init__(self, estimator: Any, encoder: TabularEncoder) -> None:
        if not hasattr(estimator, "predict_proba"):
            raise ConfigError("the scikit-learn model has no predict_proba")
        classes = getattr(estimator, "classes_", None)
        if classes is None or len(classes) != 2:
            raise ConfigError("the scikit-learn model must be a fitted binary classifier")
        self.estimator = estimator
        self.encoder = encoder

    @classmethod
    def from_bytes(
        cls,
        model_bytes: bytes,
        encoder: TabularEncoder,
        serialization: str = "skops",
        trusted_types: Sequence[str] = (),
    ) -> SklearnRuntime:
        if serialization == "skops":
            import skops.io

            estimator = skops.io.loads(model_bytes, trusted=list(trusted_types))
        elif serialization == "joblib":
            import joblib

            estimator = joblib.load(io.BytesIO(model_bytes))
        else:
            raise ConfigError(f"unknown scikit-learn serialization {serialization!r}")
        return cls(estimator, encoder)

    def predict_score(self, inputs: ModelInput) -> np.ndarray:
        return self.estimator.predict_proba(inputs.frame)[:, 1].astype(np.float64)
