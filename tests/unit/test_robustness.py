"""ART's FGSM and PGD through evaluate_robustness, checked against a linear model whose
exact L-infinity flipping budget is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guarded_serving.robustness import AdversarialBatches, AttackSpace, evaluate_robustness


class Linear(torch.nn.Module):
    """logit = x . w + b over inputs of any shape (flattened)."""

    def __init__(self, w: np.ndarray, b: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w.reshape(-1), dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1) @ self.w + self.b


def _case(shape: tuple[int, ...], rows: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape)
    x = rng.normal(size=(rows, *shape)).astype(np.float32)
    module = Linear(w, 0.1)
    z = module(torch.from_numpy(x)).detach().numpy()
    # Labels: mostly the model's own answer, some wrong on purpose.
    y = (z >= 0).astype(np.int64)
    y[:20] = 1 - y[:20]
    return module, x, y, w, z


def _exact_flip_rate(z: np.ndarray, y: np.ndarray, budget: float) -> float:
    """For a linear model the worst case within the L-inf ball moves the logit by
    sum(epsilon_i * |w_i|): a correct row flips iff that reaches its margin."""
    correct = (z >= 0) == (y == 1)
    return float((np.abs(z[correct]) <= budget).mean())


def test_scalar_budget_success_rates_match_the_exact_answer() -> None:
    module, x, y, w, z = _case((4, 5))
    epsilon = 0.05

    result = evaluate_robustness(module, x, y, epsilon=epsilon, steps=10)

    expected = _exact_flip_rate(z, y, epsilon * np.abs(w).sum())
    assert result["rows"] == 200
    assert result["correct"] == 180
    assert result["clean_accuracy"] == pytest.approx(0.9)
    # FGSM's one full step is optimal for a linear model; PGD must find it too.
    assert result["fgsm_success_rate"] == pytest.approx(expected, abs=0.011)
    assert result["pgd_success_rate"] == pytest.approx(expected, abs=0.011)
    assert 0.1 < expected < 0.9
    assert result["pgd_accuracy"] == pytest.approx(0.9 * (1 - result["pgd_success_rate"]))
    assert result["steps"] == 10 and result["step_fraction"] == pytest.approx(0.25)


def test_per_feature_budget_is_applied_per_feature() -> None:
    module, x, y, w, z = _case((6, 3), seed=1)
    per_channel = np.array([0.01, 0.2, 0.05], dtype=np.float32)

    result = evaluate_robustness(module, x, y, epsilon=per_channel, steps=10, seed=3)

    expected = _exact_flip_rate(z, y, float((np.abs(w) * per_channel).sum()))
    assert result["pgd_success_rate"] == pytest.approx(expected, abs=0.011)
    assert result["fgsm_success_rate"] == pytest.approx(expected, abs=0.011)
    assert result["epsilon"] == pytest.approx(per_channel.tolist())


def test_attacks_stay_inside_the_budget_and_the_valid_range() -> None:
    module, x, y, *_ = _case((3, 4), rows=64, seed=2)
    x = np.clip(x, -1.0, 1.0)
    per_channel = np.array([0.5, 0.05, 0.2, 0.01], dtype=np.float32)
    space = AttackSpace(module, (3, 4), per_channel, clip_values=(-1.0, 1.0))

    adversarial = space.attack(space.pgd(steps=7, step_fraction=0.4), x, y)

    assert adversarial.dtype == np.float32 and adversarial.shape == x.shape
    assert np.all(np.abs(adversarial - x) <= per_channel + 1e-6)
    assert adversarial.min() >= -1.0 and adversarial.max() <= 1.0
    assert not np.allclose(adversarial, x)


def test_the_decision_threshold_is_the_models() -> None:
    module, x, y, w, z = _case((10,), seed=4)
    # At a threshold of 0.8 the model says positive only from a logit of log(4).
    cut = float(np.log(4.0))
    y = (z >= cut).astype(np.int64)

    result = evaluate_robustness(module, x, y, epsilon=0.02, steps=10, threshold=0.8)

    assert result["clean_accuracy"] == 1.0
    budget = 0.02 * np.abs(w).sum()
    assert result["pgd_success_rate"] == pytest.approx(
        float((np.abs(z - cut) <= budget).mean()), abs=0.011
    )


def test_pgd_is_seeded_and_leaves_numpy_state_alone() -> None:
    module, x, y, *_ = _case((8,), seed=5)
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)

    first = evaluate_robustness(module, x, y, epsilon=0.1, steps=3, seed=9)
    second = evaluate_robustness(module, x, y, epsilon=0.1, steps=3, seed=9)

    assert first == second
    assert np.random.random() == before


def test_adversarial_batches_attack_the_current_weights() -> None:
    module, x, y, *_ = _case((5,), rows=32, seed=6)
    craft = AdversarialBatches(module, (5,), 0.1, steps=3)

    before = craft(x, y)
    with torch.no_grad():
        module.w.neg_()
    after = craft(x, y)

    # The direction of the attack follows the weights' sign.
    assert np.all(np.abs(before - x) <= 0.1 + 1e-6)
    assert np.mean(np.sign(before - x) == np.sign(after - x)) < 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "positive"),
        ({"epsilon": np.ones(7)}, "broadcast"),
        ({"epsilon": np.ones(5), "step_size": np.arange(1, 6) * 0.1}, "same fraction"),
        ({"epsilon": 0.1, "steps": 0}, "steps"),
    ],
)
def test_budgets_that_do_not_fit_are_refused(kwargs: dict, message: str) -> None:
    module, x, y, *_ = _case((5,), rows=8)

    with pytest.raises(ValueError, match=message):
        evaluate_robustness(module, x, y, **{"steps": 5, **kwargs})


def test_labels_must_be_binary_and_aligned() -> None:
    module, x, y, *_ = _case((5,), rows=8)

    with pytest.raises(ValueError, match="same number of rows"):
        evaluate_robustness(module, x, y[:-1], epsilon=0.1)
    with pytest.raises(ValueError, match="0 and 1"):
        evaluate_robustness(module, x, y + 1, epsilon=0.1)
