"""Tensor models through the same front door: wrap, open, score, explain as maps."""

from __future__ import annotations

import io
import warnings

import bentoml
import numpy as np
import pytest
import torch

from guarded_serving.errors import ConfigError
from guarded_serving.policy import Policy
from guarded_serving.registry import open_model
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.wrap import wrap_model

IMAGE_POLICY = {
    "model": "tiny_image",
    "input": {"shape": [28, 28], "axes": ["row", "column"], "min": 0, "max": 1,
              "png_scale": 255},
    "output": {"positive_label": "yes", "negative_label": "no", "model_output": "margin"},
    "explanation": {"gradient": {"steps": 16, "background_rows": 8, "tolerance": 0.02}},
}  # fmt: skip
SEQUENCE_POLICY = {
    "model": "tiny_sequence",
    "input": {"shape": [6, 3], "axes": ["cycle", "sensor"], "min": [0, 0, 0],
              "max": [1, 2, 3], "range_axis": 1, "channel_names": ["a", "b", "c"]},
    "output": {"positive_label": "yes", "negative_label": "no", "model_output": "margin"},
}  # fmt: skip


class _Cnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 5)
        self.head = torch.nn.Linear(4 * 24 * 24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)).squeeze(-1)


class _Gru(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(3, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1]).squeeze(-1)


def _scripted(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_model(master_key):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = rng.random((120, 28, 28), dtype=np.float32)
    result = wrap_model(
        policy=Policy.model_validate(IMAGE_POLICY),
        runtime="torchscript",
        model_bytes=_scripted(_Cnn()),
        train=data[:90],
        calibration=data[90:],
        provider=master_key,
    )
    yield result, data
    bentoml.models.delete(result.tag)


def test_image_models_are_explained_as_maps_with_patches(image_model, master_key):
    result, data = image_model
    assert result.manifest["explainer"]["method"] == "integrated_gradients"
    model = open_model(result.tag, master_key)
    inputs = ModelInput(list(data[:3]), model.encoder)
    scores = model.runtime.predict_score(inputs)
    for explanation, score in zip(model.explainer.explain(inputs), scores, strict=True):
        grid = np.asarray(explanation.attributions["map"])
        assert grid.shape == (28, 28)
        patches = np.asarray(explanation.attributions["patches"])
        assert patches.shape == (7, 7)
        assert patches.sum() == pytest.approx(grid.sum(), abs=1e-9)
        assert abs(explanation.base_value + grid.sum() - score) <= explanation.tolerance
        assert explanation.details["completeness_gap"] == pytest.approx(
            score - explanation.base_value - grid.sum(), abs=1e-9
        )


def test_anomaly_guard_flags_noise_images(image_model, master_key):
    result, data = image_model
    model = open_model(result.tag, master_key)
    detector = model.anomaly.detector
    assert detector.reference_.shape[1] == 28 * 28
    blank = ModelInput([np.zeros((28, 28), dtype=np.float32)], model.encoder)
    assert detector.score(blank.matrix)[0] > detector.threshold_


def test_sequence_models_report_totals_per_channel(master_key):
    rng = np.random.default_rng(1)
    data = (rng.random((80, 6, 3)) * np.array([1, 2, 3])).astype(np.float32)
    result = wrap_model(
        policy=Policy.model_validate(SEQUENCE_POLICY),
        runtime="torchscript",
        model_bytes=_scripted(_Gru()),
        train=data,
        provider=master_key,
    )
    try:
        model = open_model(result.tag, master_key)
        (explanation,) = model.explainer.explain(ModelInput([data[0]], model.encoder))
        totals = explanation.attributions["totals"]
        assert list(totals) == ["a", "b", "c"]
        grid = np.asarray(explanation.attributions["map"])
        assert grid.shape == (6, 3)
        np.testing.assert_allclose(list(totals.values()), grid.sum(axis=0), atol=1e-12)
    finally:
        bentoml.models.delete(result.tag)


def test_tensor_data_outside_the_policy_is_refused(master_key):
    data = np.full((40, 6, 3), 0.5, dtype=np.float32)
    data[7, 2, 0] = 5.0
    with pytest.raises(ConfigError, match=r"row 7 breaks the policy at \[2\]\[0\]: out_of_range"):
        wrap_model(
            policy=Policy.model_validate(SEQUENCE_POLICY),
            runtime="torchscript",
            model_bytes=_scripted(_Gru()),
            train=data,
            calibration=data[:20].copy() * 0 + 0.5,
            provider=master_key,
        )
    with pytest.raises(ConfigError, match="shape"):
        wrap_model(
            policy=Policy.model_validate(SEQUENCE_POLICY),
            runtime="torchscript",
            model_bytes=_scripted(_Gru()),
            train=np.zeros((40, 5, 3), dtype=np.float32),
            provider=master_key,
        )
