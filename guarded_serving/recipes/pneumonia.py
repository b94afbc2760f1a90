"""Recipe: the pneumonia reference model, a small CNN on PneumoniaMNIST chest X-rays.

Trains two variants on the vendored data's own train/validation/test split, each
keeping the epoch that scores best on validation:

- ``standard``: plain training on the images;
- ``hardened``: PGD adversarial training (Madry et al. 2018): every batch is
  replaced by ART's PGD examples against the current weights, at the budget the
  model is audited against (``EPSILON``, L-infinity on the 0-1 pixel scale).

Both are measured on the test split (accuracy, F1, ROC AUC; FGSM and PGD success
rates from ART), exported to TorchScript and ONNX (checked to agree with torch), and
wrapped like any user's model, the hardened one last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from guarded_serving import vault
from guarded_serving.policy import Policy
from guarded_serving.recipes import _networks
from guarded_serving.robustness import AdversarialBatches, evaluate_robustness, logits

logger = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "pneumonia"
DATA_FILE = MODEL_DIR / "data" / "pneumoniamnist.npz"
POLICY_FILE = MODEL_DIR / "policy.yaml"
SEED = 20240612
IMAGE_SHAPE = (28, 28)
VARIANTS = ("standard", "hardened")

# The attack budget the hardened variant is trained for and both are audited at
# (the policy's ``robustness`` section says the same): 0.05 on the 0-1 scale is
# about 13 of 255 grey levels per pixel, a change a radiologist would not notice
# on these low-resolution images, yet enough to fool a plain CNN on nearly every one.
EPSILON = 0.05
PGD_STEPS = 10
PGD_STEP_SIZE = 2.5 * EPSILON / PGD_STEPS
CLIP_VALUES = (0.0, 1.0)
# Training attacks take fewer steps of the same budget (2.5 * epsilon / steps each):
# enough to find strong examples, at half the cost per batch.
TRAIN_PGD_STEPS = 5


@dataclass(frozen=True)
class Settings:
    """How much work one training run does."""

    epochs: int
    hardened_epochs: int
    train_rows: int | None = None
    """Train on a seeded sample of this many images (all when ``None``)."""
    robustness_rows: int | None = None
    """Attack a seeded sample of this many test images (all when ``None``)."""
    width: int = 16
    batch_size: int = 64
    learning_rate: float = 2e-3


FULL = Settings(epochs=15, hardened_epochs=15)
FAST = Settings(epochs=2, hardened_epochs=2, train_rows=384, robustness_rows=64)


@dataclass(frozen=True)
class Splits:
    """Images as float32 ``[N, 28, 28]`` on the 0-1 scale; labels 1 = pneumonia."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def rows(self) -> dict[str, int]:
        return {
            "train": len(self.y_train),
            "validation": len(self.y_val),
            "test": len(self.y_test),
        }


def load_splits(path: Path = DATA_FILE) -> Splits:
    """The vendored train, validation and test splits, pixels divided by 255."""
    with np.load(path, allow_pickle=False) as data:
        parts = []
        for split in ("train", "val", "test"):
            parts.append(data[f"{split}_images"].astype(np.float32) / np.float32(255.0))
            parts.append(data[f"{split}_labels"].reshape(-1).astype(np.float32))
    return Splits(*parts)


def test_data() -> tuple[np.ndarray, np.ndarray]:
    """The held-out test images (float32 ``[468, 28, 28]``) and labels (int64, 1 = pneumonia)."""
    splits = load_splits()
    return splits.x_test, splits.y_test.astype(np.int64)


class PneumoniaNet(nn.Module):
    """Three 3x3 convolution blocks (ReLU, 2x2 max-pooling) and a small dense head.

    Takes pixel values on the 0-1 scale, ``[N, 28, 28]``, standardizes them with
    the training images' mean and spread, and returns the pneumonia logit ``[N]``.
    """

    def __init__(self, mean: float = 0.5, std: float = 0.25, width: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 3x3
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * 9, 32), nn.ReLU(), nn.Linear(32, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x - self.mean) / self.std).unsqueeze(1)
        return self.head(self.features(z)).squeeze(-1)


def build_model(mean: float = 0.5, std: float = 0.25, width: int = 16) -> PneumoniaNet:
    """A fresh network whose input standardization uses ``mean`` and ``std``."""
    return PneumoniaNet(mean, std, width)


def train(
    splits: Splits,
    variant: str,
    settings: Settings = FULL,
    *,
    seed: int = SEED,
    echo: Callable[[str], Any] | None = None,
) -> tuple[PneumoniaNet, _networks.Fit]:
    """Train one variant, keeping the best epoch on validation.

    The standard variant is scored by validation accuracy, the hardened one by
    validation accuracy under PGD (``TRAIN_PGD_STEPS`` steps at ``EPSILON``).

    Raises:
        ValueError: An unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
    x, y = _training_rows(splits, settings, seed)
    with _networks.seeded(seed):
        module = build_model(float(x.mean()), float(x.std()), settings.width)
        craft, score = None, _accuracy_scorer(splits.x_val, splits.y_val)
        epochs = settings.epochs
        if variant == "hardened":
            craft = _pgd_batches(module, TRAIN_PGD_STEPS)
            score = _robust_accuracy_scorer(splits.x_val, splits.y_val)
            epochs = settings.hardened_epochs
        result = _networks.fit(
            module,
            x,
            y,
            epochs=epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            score=score,
            seed=seed,
            craft=craft,
            echo=echo,
        )
    return module, result


def evaluate(
    module: nn.Module, splits: Splits, robustness_rows: int | None = None, seed: int = SEED
) -> dict[str, Any]:
    """Validation and test figures, and the test split's FGSM and PGD success rates.

    Args:
        module: A trained network.
        splits: The data.
        robustness_rows: Attack a seeded sample of this many test images (all when
            ``None``).
        seed: Seed of the sample and of PGD's random start.
    """
    attacked = _networks.sample(len(splits.y_test), robustness_rows, seed)
    robustness = evaluate_robustness(
        module,
        splits.x_test[attacked],
        splits.y_test[attacked],
        epsilon=EPSILON,
        steps=PGD_STEPS,
        step_size=PGD_STEP_SIZE,
        clip_values=CLIP_VALUES,
        seed=seed,
    )
    robustness["epsilon_unit"] = "absolute"
    return {
        "validation": _networks.binary_figures(splits.y_val, logits(module, splits.x_val)),
        "test": _networks.binary_figures(splits.y_test, logits(module, splits.x_test)),
        "robustness": robustness,
    }


def train_all(fast: bool = False, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train, evaluate and export both variants.

    Args:
        fast: Few epochs on a sample of the training images, attacks on a few
            test images: for tests, not for the published figures.
        echo: Receives progress and figures.

    Returns:
        ``standard`` and ``hardened``, each a dict with ``module``,
        ``torchscript`` and ``onnx`` (bytes) and ``metrics``; ``data``, the
        splits as float32 arrays (``x_train``, ``y_train``, ``x_val``, ``y_val``,
        ``x_test``, ``y_test``); ``seconds``, the wall time. The explainer's
        background is drawn from ``x_train`` when the variants are wrapped.
    """
    settings = FAST if fast else FULL
    start = time.perf_counter()
    splits = load_splits()
    result: dict[str, Any] = {}
    for variant in VARIANTS:
        echo(f"pneumonia/{variant}: training")
        module, run_fit = train(splits, variant, settings, echo=echo)
        metrics = {
            "variant": variant,
            "rows": {
                **splits.rows(),
                "trained_on": len(
                    _networks.sample(len(splits.y_train), settings.train_rows, SEED)
                ),
            },
            "training": {**run_fit.summary(), **_training_attack(variant)},
            **evaluate(module, splits, settings.robustness_rows),
        }
        torchscript, onnx, gaps = _networks.export(module, IMAGE_SHAPE, splits.x_test[:64])
        metrics["export_max_logit_gap"] = gaps
        result[variant] = dict(module=module, torchscript=torchscript, onnx=onnx, metrics=metrics)
        _echo_metrics(echo, variant, metrics)
    result["data"] = {
        name: getattr(splits, name)
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    }
    result["seconds"] = time.perf_counter() - start
    return result


def run(
    provider: vault.KeyProvider,
    *,
    echo: Callable[[str], Any] = print,
    name: str | None = None,
    fast: bool = False,
) -> list[str]:
    """Train both variants, wrap and register them; the hardened one last (``latest``).

    Args:
        provider: Master key provider for sealing.
        echo: Where the figures are printed.
        name: Register under this name instead of ``pneumonia``.
        fast: See :func:`train_all`.

    Returns:
        The registered tags, standard first.
    """
    policy = Policy.from_file(POLICY_FILE).renamed(name)
    trained = train_all(fast=fast, echo=echo)
    return _networks.wrap_variants(policy, trained, VARIANTS, provider, seed=SEED, echo=echo)


def _training_rows(splits: Splits, settings: Settings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rows = _networks.sample(len(splits.y_train), settings.train_rows, seed)
    return splits.x_train[rows], splits.y_train[rows]


def _pgd_batches(module: nn.Module, steps: int) -> AdversarialBatches:
    return AdversarialBatches(
        module, IMAGE_SHAPE, EPSILON, steps, 2.5 * EPSILON / steps, clip_values=CLIP_VALUES
    )


def _accuracy_scorer(x: np.ndarray, y: np.ndarray) -> Callable[[nn.Module], float]:
    return lambda module: float(((logits(module, x) >= 0) == (y == 1)).mean())


def _robust_accuracy_scorer(x: np.ndarray, y: np.ndarray) -> Callable[[nn.Module], float]:
    labels = y.astype(np.int64)

    def score(module: nn.Module) -> float:
        adversarial = _pgd_batches(module, TRAIN_PGD_STEPS)(x, labels)
        return float(((logits(module, adversarial) >= 0) == (labels == 1)).mean())

    return score


def _training_attack(variant: str) -> dict[str, Any]:
    if variant != "hardened":
        return {"adversarial": None}
    return {
        "adversarial": {
            "attack": "pgd",
            "epsilon": EPSILON,
            "epsilon_unit": "absolute",
            "steps": TRAIN_PGD_STEPS,
            "step_size": 2.5 * EPSILON / TRAIN_PGD_STEPS,
            "random_start": True,
        }
    }


def _echo_metrics(echo: Callable[[str], Any], variant: str, metrics: dict[str, Any]) -> None:
    test, attack, fit = metrics["test"], metrics["robustness"], metrics["training"]
    echo(
        f"pneumonia/{variant}: epoch {fit['best_epoch']} of {fit['epochs']} "
        f"({fit['train_seconds']:.0f} s); test accuracy {test['accuracy']:.4f}, "
        f"F1 {test['f1']:.4f}, ROC AUC {test['roc_auc']:.4f}"
    )
    echo(
        f"  at epsilon {EPSILON} (L-inf, 0-1 scale) on {attack['rows']} test images: "
        f"FGSM success {attack['fgsm_success_rate']:.3f}, PGD-{PGD_STEPS} success "
        f"{attack['pgd_success_rate']:.3f}"
    )
