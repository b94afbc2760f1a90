"""The engine-failure recipe: windows and labels on hand-made engines, the vendored
C-MAPSS splits, fast training of both variants, exports, and the policy."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml

from guarded_serving.policy import Policy
from guarded_serving.recipes import engine_failure as ef
from guarded_serving.robustness import logits


@pytest.fixture(scope="module")
def splits() -> ef.Splits:
    return ef.load_splits()


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """Both variants trained once in fast mode."""
    lines: list[str] = []
    result = ef.train_all(fast=True, echo=lines.append)
    result["echoed"] = lines
    return result


def _engine(unit: int, cycles: int) -> pd.DataFrame:
    """An engine whose every sensor reads its cycle number plus the sensor's position/100."""
    frame = pd.DataFrame({"unit": unit, "cycle": np.arange(1, cycles + 1)})
    for i, name in enumerate(ef.FEATURES):
        frame[name] = frame["cycle"] + i / 100
    return frame


def test_windows_of_an_engine_run_to_failure() -> None:
    # Shuffled rows: windows follow the cycle numbers, not the file order.
    frame = _engine(7, 62).sample(frac=1.0, random_state=0)

    windows = ef.make_windows(frame)

    assert windows.x.shape == (33, 30, len(ef.FEATURES)) and windows.x.dtype == np.float32
    # Windows end at cycles 30..62; the engine fails after cycle 62.
    np.testing.assert_array_equal(windows.rul, np.arange(32, -1, -1))
    np.testing.assert_array_equal(windows.x[0, :, 0], np.arange(1, 31))
    np.testing.assert_array_equal(windows.x[-1, :, 0], np.arange(33, 63))
    np.testing.assert_allclose(windows.x[0, 0], 1 + np.arange(len(ef.FEATURES)) / 100, rtol=1e-6)
    assert set(windows.unit) == {7}
    # RUL 32 and 31 are healthy; from RUL 30 on the engine fails within the horizon.
    np.testing.assert_array_equal(windows.y[:4], [0, 0, 1, 1])
    assert windows.y.sum() == 31


def test_last_windows_use_the_true_rul_and_pad_short_engines() -> None:
    frame = pd.concat([_engine(1, 40), _engine(2, 5)])

    windows = ef.make_windows(frame, final_rul=[12, 45], last_only=True)

    np.testing.assert_array_equal(windows.unit, [1, 2])
    np.testing.assert_array_equal(windows.rul, [12, 45])
    np.testing.assert_array_equal(windows.y, [1, 0])
    np.testing.assert_array_equal(windows.x[0, :, 0], np.arange(11, 41))
    # Five cycles: the first one repeated 26 times, then cycles 2..5.
    np.testing.assert_array_equal(windows.x[1, :, 0], [1] * 26 + [2, 3, 4, 5])


def test_a_short_engine_gives_one_padded_window_among_sliding_ones() -> None:
    windows = ef.make_windows(pd.concat([_engine(1, 31), _engine(2, 3)]))

    np.testing.assert_array_equal(windows.unit, [1, 1, 2])
    np.testing.assert_array_equal(windows.rul, [1, 0, 0])
    np.testing.assert_array_equal(windows.x[2, :, 0], [1] * 28 + [2, 3])


def test_the_kept_channels_follow_the_documented_rule() -> None:
    frame = ef.load_frame("train")

    assert ef.informative_columns(frame) == ef.FEATURES
    assert len(frame) == 20631 and frame["unit"].nunique() == 100
    assert len(ef.load_frame("test")) == 13096
    rul = ef.load_test_rul()
    assert len(rul) == 100 and int((rul <= ef.HORIZON).sum()) == 25


def test_validation_engines_are_held_out_by_engine(splits: ef.Splits) -> None:
    train_units, val_units = ef.split_engines(range(1, 101))

    assert len(train_units) == 80 and len(val_units) == 20
    assert not set(train_units) & set(val_units)
    np.testing.assert_array_equal(val_units, ef.split_engines(range(1, 101))[1])
    assert set(np.unique(splits.train.unit)) == set(train_units)
    assert set(np.unique(splits.val.unit)) == set(val_units)


def test_splits_have_the_documented_shapes(splits: ef.Splits) -> None:
    rows = splits.rows()

    assert rows["train_engines"] == 80 and rows["validation_engines"] == 20
    assert rows["test_engines"] == 100
    # Every training engine gives one window per cycle from its 30th on.
    assert rows["train_windows"] + rows["validation_windows"] == 20631 - 29 * 100
    assert rows["test_windows"] == 13096 - 29 * 100
    assert splits.train.x.shape[1:] == (ef.WINDOW, len(ef.FEATURES))
    assert int(splits.test.y.sum()) == 25
    assert splits.mean.shape == splits.std.shape == (len(ef.FEATURES),)
    x, y = ef.test_data()
    np.testing.assert_array_equal(x, splits.test.x)
    assert y.dtype == np.int64 and x.shape == (100, 30, 14)


def test_every_window_lies_inside_the_policy_range(splits: ef.Splits) -> None:
    policy = Policy.from_file(ef.POLICY_FILE)
    low, high = np.asarray(policy.input.min), np.asarray(policy.input.max)

    for part in (splits.train, splits.val, splits.test_all):
        assert np.all(part.x >= low) and np.all(part.x <= high)
    assert np.all(splits.low >= low) and np.all(splits.high <= high)


def test_the_budget_is_about_each_sensors_measurement_noise(splits: ef.Splits) -> None:
    ratio = ef.epsilon(splits) / ef.measurement_noise(ef.load_frame("train"))

    above = [name for name, r in zip(ef.FEATURES, ratio, strict=True) if r >= 1.0]
    assert above == ["sensor_9", "sensor_14"]
    assert ratio.max() < 1.25


def test_the_network_takes_a_window_and_returns_one_logit_per_row(splits: ef.Splits) -> None:
    module = ef.build_model(splits.mean, splits.std).eval()

    out = module(torch.from_numpy(splits.test.x[:4]))

    assert out.shape == (4,)


def test_fast_mode_trains_evaluates_and_exports_both_variants(trained: dict[str, Any]) -> None:
    for variant in ef.VARIANTS:
        metrics = trained[variant]["metrics"]
        assert metrics["test"]["rows"] == 100 and metrics["test"]["positives"] == 25
        assert 0.0 <= metrics["test"]["f1"] <= 1.0
        assert metrics["validation"]["rows"] == metrics["rows"]["validation_windows"]
        assert metrics["rows"]["trained_on"] == ef.FAST.train_windows
        for key in ("robustness", "robustness_all_windows"):
            attack = metrics[key]
            assert attack["rows"] == ef.FAST.robustness_windows
            assert attack["epsilon_std_fraction"] == ef.EPSILON_STD_FRACTION
            assert len(attack["epsilon"]) == len(ef.FEATURES)
            assert 0.0 <= attack["pgd_success_rate"] <= 1.0
        assert max(metrics["export_max_logit_gap"].values()) <= 1e-4
    data = trained["data"]
    assert data["x_test"].shape == (100, 30, 14) and data["y_test"].dtype == np.float32
    assert any(line.startswith("engine_failure/hardened: epoch") for line in trained["echoed"])


def test_onnx_and_torchscript_agree_with_torch(trained: dict[str, Any], splits: ef.Splits) -> None:
    x = splits.val.x[:40]
    for variant in ef.VARIANTS:
        want = logits(trained[variant]["module"], x)
        session = ort.InferenceSession(
            trained[variant]["onnx"], providers=["CPUExecutionProvider"]
        )
        scripted = torch.jit.load(io.BytesIO(trained[variant]["torchscript"]))

        for rows in (slice(0, 1), slice(0, 9), slice(0, 40)):
            (got,) = session.run(["logit"], {"x": x[rows]})
            np.testing.assert_allclose(got, want[rows], atol=1e-4)
            with torch.no_grad():
                np.testing.assert_allclose(
                    scripted(torch.from_numpy(x[rows])).numpy(), want[rows], atol=1e-4
                )


def test_the_policy_describes_the_windows_and_the_budget() -> None:
    raw = yaml.safe_load(ef.POLICY_FILE.read_text(encoding="utf-8"))
    policy = Policy.from_file(ef.POLICY_FILE)
    low, high = ef.channel_ranges(ef.load_frame("train"))

    assert policy.model == "engine_failure" and not policy.features
    assert policy.input.shape == [ef.WINDOW, len(ef.FEATURES)]
    assert policy.input.axes == ["cycle", "sensor"] and policy.input.range_axis == 1
    assert policy.input.channel_names == ef.FEATURES
    assert policy.input.min == low and policy.input.max == high
    assert policy.output.model_output == "margin"
    assert raw["robustness"] == {
        "epsilon": ef.EPSILON_STD_FRACTION,
        "epsilon_unit": "std_fraction",
        "pgd_steps": ef.PGD_STEPS,
        "pgd_step_size": ef.PGD_STEP_SIZE_STD_FRACTION,
    }
