"""xgboost runtime: a Booster loaded from JSON or UBJSON bytes held in memory."""

from __future__ import annotations

import threading

import numpy as np
import xgboost as xgb

from guarded_serving.runtimes.base import ModelInput


class XGBoostRuntime:
    """Binary xgboost classifier scored on the one-hot matrix; returns margins.

    Args:
        booster: A trained booster with a binary logistic objective.
    """

    kind = "xgboost"
    output_space = "margin"

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster
        # Prediction is thread-safe in xgboost, but one lock keeps each call on one
        # core, so that latency stays predictable under concurrent requests.
        self._lock = threading.Lock()

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> XGBoostRuntime:
        booster = xgb.Booster()
        booster.load_model(bytearray(model_bytes))
        booster.set_param({"nthread": 1})
        return cls(booster)

    @property
    def n_features(self) -> int:
        return int(self.booster.num_features())

    def to_bytes(self) -> bytes:
        return bytes(self.booster.save_raw(raw_format="ubj"))

    def predict_score(self, inputs: ModelInput) -> np.ndarray:
        return self.predict_margin(inputs.matrix)

    def predict_margin(self, matrix: np.ndarray) -> np.ndarray:
        with self._lock:
            dmatrix = xgb.DMatrix(matrix, nthread=1)
            return self.booster.predict(dmatrix, output_margin=True).astype(np.float64)

    def contributions(self, matrix: np.ndarray) -> np.ndarray:
        """Exact TreeSHAP values per encoded column, the bias in the last column."""
        with self._lock:
            dmatrix = xgb.DMatrix(matrix, nthread=1)
            return self.booster.predict(dmatrix, pred_contribs=True)
