"""xgboost runtime: a Booster loaded from UBJSON bytes held in memory."""

from __future__ import annotations

import threading

import numpy as np
import xgboost as xgb


class XGBoostRuntime:
    """Binary xgboost classifier scored on encoded matrices.

    Args:
        booster: A trained booster with a ``binary:logistic`` objective.
    """

    kind = "xgboost"

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster
        # Booster prediction is thread-safe, but DMatrix construction with nthread>1
        # competes with the server's own threads; one lock keeps latency predictable.
        self._lock = threading.Lock()

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> XGBoostRuntime:
        booster = xgb.Booster()
        booster.load_model(bytearray(model_bytes))
        booster.set_param({"nthread": 1})
        return cls(booster)

    def to_bytes(self) -> bytes:
        return bytes(self.booster.save_raw(raw_format="ubj"))

    def predict_margin(self, matrix: np.ndarray) -> np.ndarray:
        with self._lock:
            dmatrix = xgb.DMatrix(matrix, nthread=1)
            return self.booster.predict(dmatrix, output_margin=True).astype(np.float64)

    def contributions(self, matrix: np.ndarray) -> np.ndarray:
        """Exact TreeSHAP values per encoded column, the bias in the last column."""
        with self._lock:
            dmatrix = xgb.DMatrix(matrix, nthread=1)
            return self.booster.predict(dmatrix, pred_contribs=True)
