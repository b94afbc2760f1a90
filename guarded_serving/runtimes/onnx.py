"""ONNX Runtime: a session built from bytes in memory.

The model's inputs decide how rows are fed: one float tensor whose width is the
one-hot matrix's, or one input per feature named after it (as skl2onnx exports
pipelines over data frames), numbers as ``[N, 1]`` float or int tensors and
categories as ``[N, 1]`` strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from guarded_serving.encoding import TabularEncoder, TensorEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.policy import CategoricalFeature
from guarded_serving.runtimes.base import ModelInput, OutputSpace

_NUMERIC = {"tensor(float)": np.float32, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32}  # fmt: skip


class OnnxRuntime:
    """A binary classifier exported to ONNX."""

    kind = "onnx"

    def __init__(
        self,
        session: ort.InferenceSession,
        encoder: TabularEncoder | TensorEncoder,
        output_space: OutputSpace,
    ) -> None:
        self.session = session
        self.encoder = encoder
        self.output_space = output_space
        inputs = session.get_inputs()
        names = {i.name: i for i in inputs}
        features = encoder.policy.features
        if len(inputs) == 1 and inputs[0].type in ("tensor(float)", "tensor(double)"):
            declared = list(inputs[0].shape or [])[1:]
            expected = list(encoder.input_shape)
            fixed = all(isinstance(d, int) for d in declared)
            if fixed and declared != expected:
                raise ConfigError(
                    f"the ONNX input {inputs[0].name} takes records of shape {declared}, "
                    f"the policy declares {expected}"
                )
            self._feed = "matrix"
            self._dtype = _NUMERIC[inputs[0].type]
        elif all(f.name in names for f in features) and len(names) == len(features):
            self._feed = "columns"
            for feature in features:
                expected = "tensor(string)" if isinstance(feature, CategoricalFeature) else None
                got = names[feature.name].type
                if expected and got != expected:
                    raise ConfigError(f"ONNX input {feature.name} is {got}, expected {expected}")
                if not expected and got not in _NUMERIC:
                    raise ConfigError(f"ONNX input {feature.name} is {got}, expected a number")
            self._column_types = {n: i.type for n, i in names.items()}
        else:
            raise ConfigError(
                "the ONNX inputs match neither one float matrix of the policy's encoded width "
                "nor one input per policy feature (got: " + ", ".join(names) + ")"
            )
        self._output = self._pick_output()

    @classmethod
    def from_bytes(
        cls,
        model_bytes: bytes,
        encoder: TabularEncoder | TensorEncoder,
        output_space: OutputSpace | None = None,
    ) -> OnnxRuntime:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        return cls(session, encoder, output_space or "probability")

    def _pick_output(self) -> str:
        outputs = self.session.get_outputs()
        for output in outputs:
            if output.name in ("probabilities", "output_probability"):
                return output.name
        for output in outputs:
            if output.type in ("tensor(float)", "tensor(double)"):
                return output.name
        raise ConfigError("the ONNX model has no float output to read a score from")

    def _feeds(self, inputs: ModelInput) -> dict[str, Any]:
        if self._feed == "matrix":
            return {self.session.get_inputs()[0].name: inputs.tensor.astype(self._dtype)}
        frame = inputs.frame
        feeds = {}
        for name, onnx_type in self._column_types.items():
            column = frame[name].to_numpy().reshape(-1, 1)
            if onnx_type == "tensor(string)":
                feeds[name] = column.astype(object)
            else:
                feeds[name] = column.astype(_NUMERIC[onnx_type])
        return feeds

    def predict_score(self, inputs: ModelInput) -> np.ndarray:
        (raw,) = self.session.run([self._output], self._feeds(inputs))
        if isinstance(raw, list):  # ZipMap output: one {class: probability} per row
            key = 1 if 1 in raw[0] else sorted(raw[0])[-1]
            return np.array([row[key] for row in raw], dtype=np.float64)
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim == 2 and raw.shape[1] == 2:
            return raw[:, 1]
        return raw.reshape(len(inputs))
