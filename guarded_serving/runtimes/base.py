"""The runtime interface every model kind implements, and lookup by kind."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from guarded_serving.errors import ConfigError


class Runtime(Protocol):
    """A loaded model. It never reads or writes weights on disk."""

    kind: str

    def predict_margin(self, matrix: np.ndarray) -> np.ndarray:
        """Raw model output before the link function (log-odds for binary models)."""
        ...


def load_runtime(kind: str, model_bytes: bytes) -> Runtime:
    """Build the runtime for ``kind`` from the model's serialized bytes."""
    if kind == "xgboost":
        from guarded_serving.runtimes.xgboost import XGBoostRuntime

        return XGBoostRuntime.from_bytes(model_bytes)
    raise ConfigError(f"unknown runtime kind {kind!r} (known: xgboost)")
