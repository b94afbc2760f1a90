"""The pneumonia recipe: the vendored images, the network, fast training of both variants,
exports that agree with torch, and the policy that describes them."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from guarded_serving.policy import Policy
from guarded_serving.recipes import pneumonia
from guarded_serving.robustness import evaluate_robustness, logits


@pytest.fixture(scope="module")
def splits() -> pneumonia.Splits:
    return pneumonia.load_splits()


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """Both variants trained once in fast mode."""
    lines: list[str] = []
    result = pneumonia.train_all(fast=True, echo=lines.append)
    result["echoed"] = lines
    return result


def test_splits_have_the_documented_shapes_and_balance(splits: pneumonia.Splits) -> None:
    assert splits.rows() == {"train": 2428, "validation": 270, "test": 468}
    for x, y, positives in (
        (splits.x_train, splits.y_train, 1214),
        (splits.x_val, splits.y_val, 135),
        (splits.x_test, splits.y_test, 234),
    ):
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert x.shape == (len(y), 28, 28)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert set(np.unique(y)) == {0.0, 1.0}
        assert int(y.sum()) == positives


def test_test_data_is_the_test_split(splits: pneumonia.Splits) -> None:
    x, y = pneumonia.test_data()

    assert y.dtype == np.int64
    np.testing.assert_array_equal(x, splits.x_test)
    np.testing.assert_array_equal(y, splits.y_test.astype(np.int64))


def test_the_network_takes_pixels_and_returns_one_logit_per_row() -> None:
    module = pneumonia.build_model(mean=0.5, std=0.25).eval()

    out = module(torch.rand(5, 28, 28))

    assert out.shape == (5,)
    # Standardization is inside the module: shifting the mean shifts the input.
    other = pneumonia.build_model(mean=0.1, std=0.25)
    other.load_state_dict({**module.state_dict(), "mean": torch.tensor(0.1)})
    assert not torch.allclose(
        other(torch.full((1, 28, 28), 0.5)), module(torch.full((1, 28, 28), 0.5))
    )


def test_training_is_deterministic(splits: pneumonia.Splits) -> None:
    settings = pneumonia.Settings(epochs=1, hardened_epochs=1, train_rows=128)
    outputs = []
    for _ in range(2):
        module, fit = pneumonia.train(splits, "standard", settings)
        outputs.append(logits(module, splits.x_test[:32]))

    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert fit.epochs == 1 and fit.best_epoch == 1


def test_an_unknown_variant_is_refused(splits: pneumonia.Splits) -> None:
    with pytest.raises(ValueError, match="variant"):
        pneumonia.train(splits, "robust", pneumonia.FAST)


def test_fast_mode_trains_evaluates_and_exports_both_variants(trained: dict[str, Any]) -> None:
    for variant in pneumonia.VARIANTS:
        metrics = trained[variant]["metrics"]
        assert metrics["variant"] == variant
        assert metrics["rows"]["trained_on"] == pneumonia.FAST.train_rows
        assert metrics["test"]["rows"] == 468
        assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
        assert 0.0 <= metrics["test"]["roc_auc"] <= 1.0
        attack = metrics["robustness"]
        assert attack["rows"] == pneumonia.FAST.robustness_rows
        assert attack["epsilon"] == pneumonia.EPSILON and attack["steps"] == pneumonia.PGD_STEPS
        assert 0.0 <= attack["fgsm_success_rate"] <= 1.0
        assert 0.0 <= attack["pgd_success_rate"] <= 1.0
        assert max(metrics["export_max_logit_gap"].values()) <= 1e-4
        assert trained[variant]["torchscript"] and trained[variant]["onnx"]
    assert trained["hardened"]["metrics"]["training"]["adversarial"]["attack"] == "pgd"
    assert trained["standard"]["metrics"]["training"]["adversarial"] is None
    data = trained["data"]
    assert data["x_train"].shape == (2428, 28, 28) and data["x_train"].dtype == np.float32
    assert data["y_val"].dtype == np.float32
    assert any(line.startswith("pneumonia/hardened: epoch") for line in trained["echoed"])


def test_onnx_and_torchscript_agree_with_torch(
    trained: dict[str, Any], splits: pneumonia.Splits
) -> None:
    x = splits.x_test[:50]
    for variant in pneumonia.VARIANTS:
        module = trained[variant]["module"]
        want = logits(module, x)
        session = ort.InferenceSession(
            trained[variant]["onnx"], providers=["CPUExecutionProvider"]
        )
        scripted = torch.jit.load(io.BytesIO(trained[variant]["torchscript"]))

        assert [i.name for i in session.get_inputs()] == ["x"]
        for rows in (slice(0, 1), slice(0, 13), slice(0, 50)):
            (got,) = session.run(["logit"], {"x": x[rows]})
            np.testing.assert_allclose(got, want[rows], atol=1e-4)
            with torch.no_grad():
                np.testing.assert_allclose(
                    scripted(torch.from_numpy(x[rows])).numpy(), want[rows], atol=1e-4
                )


def test_evaluation_runs_on_the_scripted_module_as_well(
    trained: dict[str, Any], splits: pneumonia.Splits
) -> None:
    scripted = torch.jit.load(io.BytesIO(trained["hardened"]["torchscript"]))
    kwargs = dict(epsilon=pneumonia.EPSILON, steps=3, clip_values=pneumonia.CLIP_VALUES, seed=1)

    a = evaluate_robustness(
        trained["hardened"]["module"], splits.x_test[:24], splits.y_test[:24], **kwargs
    )
    b = evaluate_robustness(scripted, splits.x_test[:24], splits.y_test[:24], **kwargs)

    assert a["correct"] == b["correct"]
    assert a["pgd_success_rate"] == pytest.approx(b["pgd_success_rate"], abs=1 / 24)


def test_the_policy_describes_the_model_and_its_budget(splits: pneumonia.Splits) -> None:
    raw = yaml.safe_load(pneumonia.POLICY_FILE.read_text(encoding="utf-8"))
    policy = Policy.from_file(pneumonia.POLICY_FILE)

    assert policy.model == "pneumonia"
    assert policy.input is not None and not policy.features
    assert policy.input.shape == [28, 28] and policy.input.axes == ["row", "column"]
    assert (policy.input.min, policy.input.max) == pneumonia.CLIP_VALUES
    assert policy.input.png_scale == 255
    assert policy.output.model_output == "margin"
    assert raw["robustness"] == {
        "epsilon": pneumonia.EPSILON,
        "epsilon_unit": "absolute",
        "pgd_steps": pneumonia.PGD_STEPS,
        "pgd_step_size": pneumonia.PGD_STEP_SIZE,
    }
