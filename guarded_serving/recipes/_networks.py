"""Shared by the network recipes: seeded training with epoch selection on validation,
export to TorchScript and ONNX, the check that both give the torch module's answers,
and wrapping the trained variants like any user's model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from guarded_serving import vault
from guarded_serving.policy import Policy
from guarded_serving.robustness import logits, numpy_seed
from guarded_serving.wrap import wrap_model

logger = logging.getLogger(__name__)

TORCH_THREADS = 2
"""Intra-op threads while training (the reference machine has two cores)."""
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
"""Largest allowed gap between the logits of ONNX Runtime and of torch."""


@dataclass
class Fit:
    """What one training run did: the chosen epoch and each epoch's figures."""

    best_epoch: int
    """1-based epoch whose weights were kept (highest validation score)."""
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "train_seconds": round(self.seconds, 1),
            "best_validation_score": round(self.history[self.best_epoch - 1]["score"], 4),
        }


@contextlib.contextmanager
def seeded(seed: int, threads: int = TORCH_THREADS) -> Iterator[None]:
    """Seed torch and numpy (ART's random starts), cap torch's threads; restore all after."""
    torch_state = torch.random.get_rng_state()
    previous_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        with numpy_seed(seed):
            yield
    finally:
        torch.random.set_rng_state(torch_state)
        torch.set_num_threads(previous_threads)


def fit(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    score: Callable[[torch.nn.Module], float],
    seed: int,
    craft: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    pos_weight: float | None = None,
    echo: Callable[[str], Any] | None = None,
) -> Fit:
    """Train with Adam and a one-cycle learning rate; keep the best epoch on validation.

    Args:
        module: The network (one logit per row), trained in place.
        x: Training inputs, float32.
        y: Training labels, 0 or 1.
        epochs: Passes over the training data.
        batch_size: Rows per step.
        learning_rate: Peak learning rate of the one-cycle schedule.
        score: Validation score of the module after an epoch; higher is better.
            The weights of the best epoch (the first, on ties) are restored.
        seed: Seed of the batch order.
        craft: Adversarial training: maps each batch ``(x, y)`` to the inputs
            the step trains on (PGD examples).
        pos_weight: Weight of positive rows in the loss.
        echo: Receives one line per epoch.
    """
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(x) // batch_size)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    weight = None if pos_weight is None else torch.tensor(float(pos_weight))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=weight)
    labels = np.asarray(y, dtype=np.float32)
    history: list[dict[str, float]] = []
    best_score, best_epoch = -np.inf, 1
    best_state = copy.deepcopy(module.state_dict())
    start = time.perf_counter()

    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        total = 0.0
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            batch = x[rows]
            if craft is not None:
                batch = craft(batch, labels[rows].astype(np.int64))
            module.train()
            optimizer.zero_grad()
            out = module(torch.from_numpy(batch)).reshape(-1)
            loss = loss_fn(out, torch.from_numpy(labels[rows]))
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
        module.eval()
        value = float(score(module))
        history.append({"epoch": epoch, "loss": total / len(x), "score": value})
        if echo is not None:
            echo(f"    epoch {epoch:2d}: loss {total / len(x):.4f}, validation score {value:.4f}")
        if value > best_score:
            best_score, best_state = value, copy.deepcopy(module.state_dict())
            best_epoch = epoch

    module.load_state_dict(best_state)
    module.eval()
    return Fit(best_epoch, epochs, time.perf_counter() - start, history)


def binary_figures(y: np.ndarray, logit: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1, precision, recall and ROC AUC of logits at 0 (probability 0.5)."""
    y = np.asarray(y).astype(np.int64)
    predicted = (np.asarray(logit) >= 0).astype(np.int64)
    both = len(np.unique(y)) == 2
    return {
        "rows": len(y),
        "positives": int(y.sum()),
        "accuracy": round(float((predicted == y).mean()), 4),
        "f1": round(float(f1_score(y, predicted, zero_division=0)), 4),
        "precision": round(float(precision_score(y, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(y, predicted, zero_division=0)), 4),
        "roc_auc": round(float(roc_auc_score(y, logit)), 4) if both else None,
    }


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    """The module scripted with TorchScript, serialized."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what the
        # torch runtime and the gradient explainer load.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def onnx_bytes(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The module exported to ONNX: input ``x``, output ``logit``, any batch size."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter needs no network or onnxscript. It warns
        # that it is the legacy path, that tracing a recurrent layer turns its shape
        # checks into constants, and that the layer's initial state is batch-sized
        # (zeros, rebuilt for each batch: export_gap() checks several batch sizes).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"Exporting a model to ONNX with a batch_size")
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            input_names=["x"],
            output_names=["logit"],
            dynamic_axes={"x": {0: "rows"}, "logit": {0: "rows"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def export(
    module: torch.nn.Module, input_shape: tuple[int, ...], check_rows: np.ndarray
) -> tuple[bytes, bytes, dict[str, float]]:
    """TorchScript and ONNX bytes of a network taking ``[N, *input_shape]``, and their
    largest logit gaps to torch on ``check_rows``.

    Raises:
        RuntimeError: An export disagrees with torch by more than ``ONNX_TOLERANCE``.
    """
    torchscript = torchscript_bytes(module)
    onnx = onnx_bytes(module, torch.zeros(1, *input_shape))
    return torchscript, onnx, export_gap(module, torchscript, onnx, check_rows)


def export_gap(
    module: torch.nn.Module, torchscript: bytes, onnx: bytes, x: np.ndarray
) -> dict[str, float]:
    """Largest logit gaps of the TorchScript copy and of ONNX Runtime against the module,
    over ``x`` fed in batches of several sizes.

    Raises:
        RuntimeError: A gap above ``ONNX_TOLERANCE``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    reference = logits(module, x)
    scripted = torch.jit.load(io.BytesIO(torchscript), map_location="cpu")
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    gaps = {"torchscript": 0.0, "onnx": 0.0}
    for size in (1, 7, len(x)):
        for start in range(0, min(len(x), 3 * size), size):
            rows = slice(start, start + size)
            with torch.no_grad():
                traced = scripted(torch.from_numpy(x[rows])).reshape(-1).double().numpy()
            (onnx_out,) = session.run(["logit"], {"x": x[rows]})
            want = reference[rows]
            gaps["torchscript"] = max(gaps["torchscript"], float(np.abs(traced - want).max()))
            gaps["onnx"] = max(gaps["onnx"], float(np.abs(onnx_out.reshape(-1) - want).max()))
    if max(gaps.values()) > ONNX_TOLERANCE:
        raise RuntimeError(
            f"exported model disagrees with torch: largest logit gap {max(gaps.values()):.2e} "
            f"(allowed {ONNX_TOLERANCE:.0e})"
        )
    return gaps


def sample(rows: int, size: int | None, seed: int) -> np.ndarray:
    """All row numbers, or a seeded sample of ``size`` of them in their order."""
    if size is None or size >= rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))


def wrap_variants(
    policy: Policy,
    trained: dict[str, Any],
    variants: tuple[str, ...],
    provider: vault.KeyProvider,
    *,
    seed: int,
    echo: Callable[[str], Any],
) -> list[str]:
    """Wrap each trained variant's ONNX export, in order, the torch module beside it
    for gradients; the guards are fitted on the training inputs and calibrated on
    the validation ones. Returns the registered tags."""
    data = trained["data"]
    tags = []
    for name in variants:
        one = trained[name]
        wrapped = wrap_model(
            policy=policy,
            runtime="onnx",
            model_bytes=one["onnx"],
            train=data["x_train"],
            calibration=data["x_val"],
            provider=provider,
            torch_module=one["torchscript"],
            figures=one["metrics"],
            holdout=data["x_test"],
            labels={"variant": name},
            seed=seed,
        )
        echo(
            f"  registered {wrapped.tag} ({name}; sealed with master key "
            f"{wrapped.manifest['key_id']})"
        )
        tags.append(wrapped.tag)
    return tags
