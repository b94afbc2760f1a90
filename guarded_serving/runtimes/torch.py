"""TorchScript runtime: a scripted or traced module loaded from bytes in memory.

The module takes the model input as float32 (the one-hot matrix ``[N, columns]`` of
a tabular policy, or ``[N, *shape]`` of a tensor policy) and returns one logit per
row (``[N]`` or ``[N, 1]``), or two class logits ``[N, 2]`` whose difference is the
margin; set ``output.model_output: probability`` in the policy if it ends in a
sigmoid.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from guarded_serving.errors import ConfigError
from guarded_serving.runtimes.base import ModelInput, OutputSpace


class TorchScriptRuntime:
    """A TorchScript module on the CPU, in inference mode."""

    kind = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, output_space: OutputSpace) -> None:
        self.module = module.eval()
        self.output_space = output_space

    @classmethod
    def from_bytes(
        cls, model_bytes: bytes, output_space: OutputSpace | None = None
    ) -> TorchScriptRuntime:
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream in favour of torch.export, but it is
                # still the format users ship; loading it must not warn per model.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                module = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu")
        except RuntimeError:
            raise ConfigError("the model is not a TorchScript module") from None
        return cls(module, output_space or "margin")

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        """The score per row as a differentiable tensor (used by gradient explainers)."""
        out = self.module(matrix)
        if out.ndim == 2 and out.shape[1] == 2:
            return out[:, 1] - out[:, 0]
        return out.reshape(-1)

    def predict_score(self, inputs: ModelInput) -> np.ndarray:
        with torch.inference_mode():
            out = self.forward(torch.from_numpy(np.ascontiguousarray(inputs.tensor)))
        return out.double().numpy()
