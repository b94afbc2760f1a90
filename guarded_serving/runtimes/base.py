"""The runtime interface every model kind implements, and lookup by kind.

A runtime loads a model from bytes held in memory (weights never touch the disk in
plaintext) and returns one score per row for the positive class, either a log-odds
margin or a probability, as its ``output_space`` says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from guarded_serving.encoding import TabularEncoder, TensorEncoder
from guarded_serving.errors import ConfigError

OutputSpace = Literal["margin", "probability"]
RUNTIME_KINDS = ("xgboost", "sklearn", "onnx", "torchscript")


class ModelInput:
    """Validated rows in the forms runtimes take.

    ``tensor`` is what the model takes (the one-hot matrix of a tabular policy, or the
    stacked arrays of a tensor policy); ``matrix`` the same flattened to one row per
    record (for detectors); ``frame`` the raw tabular features.
    """

    def __init__(
        self,
        records: Sequence[Any],
        encoder: TabularEncoder | TensorEncoder,
        matrix: np.ndarray | None = None,
    ) -> None:
        self.records = records
        self.encoder = encoder
        if matrix is not None:
            if len(matrix) != len(records):
                raise ValueError("matrix and records must have the same number of rows")
            self.__dict__["tensor"] = matrix

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def tensor(self) -> np.ndarray:
        """The model's input: float32, shape ``(rows, *encoder.input_shape)``."""
        return self.encoder.encode(self.records)

    @property
    def matrix(self) -> np.ndarray:
        """The input flattened to ``(rows, columns)``; for tabular policies the same."""
        tensor = self.tensor
        return tensor.reshape(len(tensor), -1)

    @cached_property
    def frame(self) -> pd.DataFrame:
        """Raw features: numbers as float64, categories as strings, in policy order."""
        return self.encoder.frame(self.records)


class Runtime(Protocol):
    """A loaded model."""

    kind: str
    output_space: OutputSpace

    def predict_score(self, inputs: ModelInput) -> np.ndarray:
        """One float64 score per row for the positive class, in ``output_space``."""
        ...


def load_runtime(
    kind: str,
    model_bytes: bytes,
    encoder: TabularEncoder | TensorEncoder,
    output_space: OutputSpace | None = None,
    options: Mapping[str, Any] | None = None,
) -> Runtime:
    """Build the runtime for ``kind`` from the model's serialized bytes.

    Args:
        kind: One of ``RUNTIME_KINDS``.
        model_bytes: The serialized model, as wrapped.
        encoder: The policy's feature encoder.
        output_space: Override of what the model returns (from the policy).
        options: Kind-specific settings recorded at wrap time (the manifest's
            ``runtime_options``).

    Raises:
        ConfigError: Unknown kind, or a model that does not fit its policy.
    """
    options = dict(options or {})
    if kind == "xgboost":
        from guarded_serving.runtimes.xgboost import XGBoostRuntime

        runtime = XGBoostRuntime.from_bytes(model_bytes)
        if runtime.n_features != encoder.n_columns:
            raise ConfigError(
                f"the xgboost model takes {runtime.n_features} columns, the policy encodes "
                f"{encoder.n_columns}"
            )
        return runtime
    if kind == "sklearn":
        from guarded_serving.runtimes.sklearn import SklearnRuntime

        return SklearnRuntime.from_bytes(model_bytes, encoder, **options)
    if kind == "onnx":
        from guarded_serving.runtimes.onnx import OnnxRuntime

        return OnnxRuntime.from_bytes(model_bytes, encoder, output_space=output_space)
    if kind == "torchscript":
        from guarded_serving.runtimes.torch import TorchScriptRuntime

        return TorchScriptRuntime.from_bytes(model_bytes, output_space=output_space)
    raise ConfigError(f"unknown runtime kind {kind!r} (known: {', '.join(RUNTIME_KINDS)})")
