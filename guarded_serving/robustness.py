"""Robustness under attack: FGSM and PGD from the Adversarial Robustness Toolbox.

Measures how often white-box evasion attacks flip a binary network's decision, and
crafts the PGD examples that adversarial training (Madry et al. 2018) learns from.
Every attack is ART's own (``FastGradientMethod``, ``ProjectedGradientDescent``),
run against the model's gradients.

The model is a torch module returning one logit per row. ART classifies with two
class logits, so it sees ``[-m/2, m/2]`` with ``m = logit - logit(threshold)``: the
softmax of that pair is the model's probability, shifted so that ART's arg-max
decision is the model's decision at its threshold.

A budget can be one number or an array broadcastable to the input (a share of each
sensor's spread, say). ART's random start and projection take one number per
input, so a per-position budget is applied by scaling: the attack runs on
``u = x / epsilon``, where the budget is 1 everywhere, and its result is mapped
back. Every FGSM and PGD step is then exactly the per-position one.

Known limitations: only L-infinity attacks are run; gradient masking (a model whose
gradients are flat but whose decisions are not robust) would make these figures too
good, which a black-box attack would reveal and this module does not run.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier

logger = logging.getLogger(__name__)

ArrayLike = float | np.ndarray | Sequence[float]
_BATCH_ROWS = 256


class _BinaryHead(torch.nn.Module):
    """Two class logits from a one-logit module, on the scaled attack input."""

    def __init__(self, module: torch.nn.Module, scale: np.ndarray, offset: float) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.from_numpy(scale))
        self.offset = offset

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        margin = self.module(u * self.scale).reshape(-1) - self.offset
        return torch.stack([-margin / 2, margin / 2], dim=1)


class AttackSpace:
    """An L-infinity budget over inputs of one shape, in ART's coordinates.

    Args:
        module: The network, one logit per row.
        input_shape: Shape of one input row, without the batch dimension.
        epsilon: The budget: one number, or an array broadcastable to
            ``input_shape`` (all positive), in input units.
        clip_values: Lowest and highest valid input values (numbers or arrays
            broadcastable to ``input_shape``); ``None`` leaves inputs unbounded.
        threshold: Probability at or above which the model predicts the positive class.

    Raises:
        ValueError: A budget that is not positive and finite, or arrays that do not
            fit the input shape.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_shape: Sequence[int],
        epsilon: ArrayLike,
        clip_values: tuple[ArrayLike, ArrayLike] | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.epsilon = _broadcast("epsilon", epsilon, self.input_shape)
        if not (np.all(np.isfinite(self.epsilon)) and np.all(self.epsilon > 0)):
            raise ValueError("epsilon must be positive and finite everywhere")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) (got {threshold})")
        self.module = module
        self.offset = math.log(threshold / (1.0 - threshold))
        self.clip_values = None
        art_clip = None
        if clip_values is not None:
            low = _broadcast("clip_values[0]", clip_values[0], self.input_shape)
            high = _broadcast("clip_values[1]", clip_values[1], self.input_shape)
            if np.any(low > high):
                raise ValueError("clip_values: the lower bound exceeds the upper one")
            self.clip_values = (low, high)
            art_clip = (low / self.epsilon, high / self.epsilon)
        self.classifier = PyTorchClassifier(
            model=_BinaryHead(module, self.epsilon.astype(np.float32), self.offset),
            loss=torch.nn.CrossEntropyLoss(),
            input_shape=self.input_shape,
            nb_classes=2,
            clip_values=art_clip,
            device_type="cpu",
        )

    def to_attack(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) / self.epsilon).astype(np.float32)

    def from_attack(self, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Back to input units, projected once more onto the budget and the valid range
        (scaling can leave a rounding error outside either)."""
        adv = np.asarray(u, dtype=np.float64) * self.epsilon
        adv = np.clip(adv, x - self.epsilon, x + self.epsilon)
        if self.clip_values is not None:
            adv = np.clip(adv, *self.clip_values)
        return adv.astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's class (0 or 1) per row at its threshold."""
        return (logits(self.module, x) >= self.offset).astype(np.int64)

    def fgsm(self, batch_size: int = _BATCH_ROWS) -> FastGradientMethod:
        return FastGradientMethod(self.classifier, eps=1.0, eps_step=1.0, batch_size=batch_size)

    def pgd(
        self,
        steps: int,
        step_fraction: float,
        random_init: bool = True,
        batch_size: int = _BATCH_ROWS,
    ) -> ProjectedGradientDescent:
        """PGD whose steps are ``step_fraction`` of the budget."""
        return ProjectedGradientDescent(
            self.classifier,
            norm=np.inf,
            eps=1.0,
            eps_step=float(step_fraction),
            max_iter=int(steps),
            num_random_init=1 if random_init else 0,
            batch_size=batch_size,
            verbose=False,
        )

    def attack(self, attack: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Adversarial versions of ``x`` (input units) against the true labels ``y``."""
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            return x.copy()
        one_hot = np.eye(2, dtype=np.float32)[np.asarray(y, dtype=np.int64)]
        was_training = self.module.training
        try:
            u = attack.generate(self.to_attack(x), y=one_hot)
        finally:
            self.module.train(was_training)
        return self.from_attack(u, x)


class AdversarialBatches:
    """PGD examples for adversarial training (Madry et al.), crafted by ART.

    Call it on each training batch; it attacks the module's current weights, from a
    random start in the budget, against the batch's labels.

    Args:
        module: The network being trained (its weights change between calls).
        input_shape: Shape of one row.
        epsilon: Budget, as in :class:`AttackSpace`.
        steps: PGD iterations per batch.
        step_size: Per step, in the units of ``epsilon``; ``2.5 * epsilon / steps``
            when ``None``.
        clip_values: Valid input range, as in :class:`AttackSpace`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_shape: Sequence[int],
        epsilon: ArrayLike,
        steps: int,
        step_size: ArrayLike | None = None,
        clip_values: tuple[ArrayLike, ArrayLike] | None = None,
    ) -> None:
        self.space = AttackSpace(module, input_shape, epsilon, clip_values)
        fraction = _step_fraction(self.space.epsilon, step_size, steps)
        self._pgd = self.space.pgd(steps, fraction)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.space.attack(self._pgd, x, y)


def evaluate_robustness(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epsilon: ArrayLike,
    steps: int = 10,
    step_size: ArrayLike | None = None,
    clip_values: tuple[ArrayLike, ArrayLike] | None = None,
    *,
    threshold: float = 0.5,
    batch_size: int = _BATCH_ROWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Clean accuracy and the success rates of ART's FGSM and PGD at one L-inf budget.

    The success rate of an attack is the share of the correctly classified inputs
    whose predicted class the attack flips (inputs the model already gets wrong are
    not counted). PGD starts from one random point in the budget and steps
    ``steps`` times; FGSM takes one step of the whole budget. Both are untargeted
    and use the true labels.

    Args:
        module: Torch module returning one logit per row (``[N]`` or ``[N, 1]``).
        x: Inputs, float32 ``[N, *input_shape]``.
        y: True classes, 0 or 1.
        epsilon: The budget: one number or an array broadcastable to the input
            shape, in input units.
        steps: PGD iterations.
        step_size: PGD step, in the units of ``epsilon`` (an array of the same
            shape, in the same proportion to it everywhere); ``2.5 * epsilon /
            steps`` when ``None`` (Madry et al.).
        clip_values: Lowest and highest valid input values; the attacks stay inside.
        threshold: Probability at or above which the positive class is predicted.
        batch_size: Rows attacked at once.
        seed: Seed of PGD's random start.

    Returns:
        ``rows``, ``correct`` (correctly classified rows), ``clean_accuracy``,
        ``fgsm_success_rate``, ``pgd_success_rate``, ``fgsm_accuracy`` and
        ``pgd_accuracy`` (accuracy on all rows under attack), and the budget
        (``epsilon`` as given, ``steps``, ``step_fraction`` of the budget per step).

    Raises:
        ValueError: Inputs and labels of different lengths, labels other than 0/1,
            or a budget that does not fit the input.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same number of rows ({len(x)} != {len(y)})")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold class labels 0 and 1")
    if len(y) == 0:
        raise ValueError("no rows to attack")
    space = AttackSpace(module, x.shape[1:], epsilon, clip_values, threshold)
    fraction = _step_fraction(space.epsilon, step_size, steps)

    predicted = space.predict(x)
    correct = predicted == y
    x_ok, y_ok = x[correct], y[correct]
    with numpy_seed(seed):
        fgsm = space.predict(space.attack(space.fgsm(batch_size), x_ok, y_ok))
        pgd = space.predict(
            space.attack(space.pgd(steps, fraction, batch_size=batch_size), x_ok, y_ok)
        )
    n_ok = int(correct.sum())
    return {
        "rows": len(y),
        "correct": n_ok,
        "clean_accuracy": n_ok / len(y),
        "fgsm_success_rate": _share(fgsm != y_ok),
        "pgd_success_rate": _share(pgd != y_ok),
        "fgsm_accuracy": float((fgsm == y_ok).sum()) / len(y),
        "pgd_accuracy": float((pgd == y_ok).sum()) / len(y),
        "epsilon": _plain(epsilon),
        "steps": int(steps),
        "step_fraction": fraction,
    }


def logits(module: torch.nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The module's logit per row, in evaluation mode, as float64."""
    was_training = module.training
    module.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
                out.append(module(batch.float()).reshape(-1).double().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


@contextlib.contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (ART draws random starts from it), then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _broadcast(name: str, value: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    try:
        return np.ascontiguousarray(np.broadcast_to(array, shape))
    except ValueError:
        raise ValueError(
            f"{name} has shape {array.shape}, which does not broadcast to the input {shape}"
        ) from None


def _step_fraction(epsilon: np.ndarray, step_size: ArrayLike | None, steps: int) -> float:
    """The PGD step as one fraction of the budget (ART steps in the scaled space)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    if step_size is None:
        return 2.5 / steps
    ratio = _broadcast("step_size", step_size, epsilon.shape) / epsilon
    if not np.allclose(ratio, ratio.flat[0], rtol=1e-4, atol=0.0):
        raise ValueError("step_size must be the same fraction of epsilon everywhere")
    fraction = float(ratio.flat[0])
    if not fraction > 0:
        raise ValueError("step_size must be positive")
    return fraction


def _share(flags: np.ndarray) -> float:
    return float(flags.mean()) if len(flags) else 0.0


def _plain(value: ArrayLike) -> float | list[Any]:
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()
