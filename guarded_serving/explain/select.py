"""Pick each model's explainer when it is wrapped, verify it, and rebuild it at load.

At wrap time :func:`choose` tries the exact or cheapest method the model allows,
checks completeness on held-out rows, and falls back to KernelSHAP when a faster
method cannot be verified. What it settled on goes into the manifest as a plain
dict; :func:`build` turns that back into an explainer when the model is loaded.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guarded_serving.encoding import TabularEncoder, TensorEncoder
from guarded_serving.errors import ConfigError
from guarded_serving.explain.base import Explainer, describe_background
from guarded_serving.policy import Policy
from guarded_serving.runtimes.base import ModelInput, Runtime

logger = logging.getLogger(__name__)

# Tree ensembles that shap's TreeExplainer explains exactly.
_SKLEARN_TREES = (
    "HistGradientBoostingClassifier",
    "GradientBoostingClassifier",
    "RandomForestClassifier",
    "ExtraTreesClassifier",
    "DecisionTreeClassifier",
)
_MAX_STEPS = 1024


@dataclass
class ExplainerChoice:
    """What :func:`choose` settled on: JSON-ready options and the files it needs."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "notes": self.notes}


def choose(
    runtime: Runtime,
    policy: Policy,
    train: ModelInput,
    check: ModelInput,
    torch_module: bytes | None = None,
    seed: int = 0,
) -> ExplainerChoice:
    """Choose and verify the explainer of a model being wrapped.

    Args:
        runtime: The loaded model.
        policy: Its policy (``explanation`` settings).
        train: Training rows, for background sets.
        check: Held-out rows on which completeness is verified.
        torch_module: For ONNX models exported from torch: the TorchScript module,
            used for gradients while ONNX Runtime serves.
        seed: Seed of the background sample.

    Raises:
        ConfigError: The policy asks for a method this model cannot have.
    """
    wanted = policy.explanation.method
    encoder = train.encoder
    rng = np.random.default_rng(seed)
    notes: list[str] = []

    if wanted in ("auto", "tree_shap"):
        if runtime.kind == "xgboost":
            return ExplainerChoice("tree_shap", {"engine": "xgboost"})
        if runtime.kind == "sklearn":
            choice, why = _sklearn_tree(runtime, encoder, train, check)
            if choice is not None:
                return choice
            notes.append(f"TreeSHAP not used: {why}")
        if wanted == "tree_shap":
            raise ConfigError(
                f"explanation.method tree_shap: {notes[-1] if notes else runtime.kind}"
            )

    if wanted in ("auto", "gradient"):
        module = None
        if runtime.kind == "torchscript":
            module = runtime
        elif torch_module is not None:
            module = _torch_for(runtime, torch_module, check)
        if module is not None:
            return _gradient(module, policy, train, check, rng, torch_module, notes)
        if wanted == "gradient":
            raise ConfigError(
                "explanation.method gradient needs a TorchScript model, or the TorchScript "
                "module an ONNX model was exported from"
            )

    if policy.is_tensor:
        raise ConfigError(
            "tensor models are explained by gradients: wrap a TorchScript model, or give the "
            "TorchScript module of an ONNX model (--torch-module)"
        )
    rows = _sample(len(train), policy.explanation.kernel.background_rows, rng)
    background = encoder.to_codes([train.records[i] for i in rows])
    options = {"background_sha256": describe_background(background)["sha256"]}
    return ExplainerChoice("kernel_shap", options, {"background.npy": _npy(background)}, notes)


def build(
    manifest: Mapping[str, Any],
    runtime: Runtime,
    encoder: TabularEncoder | TensorEncoder,
    policy: Policy,
    files: Mapping[str, bytes],
) -> Explainer:
    """The explainer a wrapped model's manifest describes."""
    method, options = manifest["method"], manifest.get("options", {})
    if method == "tree_shap" and options.get("engine") == "xgboost":
        from guarded_serving.explain.tree import XGBoostTreeExplainer

        return XGBoostTreeExplainer(runtime, encoder)
    if method == "tree_shap":
        from guarded_serving.explain.tree import SklearnTreeExplainer

        return SklearnTreeExplainer(
            runtime, encoder, options["column_groups"], options["output_space"]
        )
    if method == "integrated_gradients":
        from guarded_serving.explain.gradient import IntegratedGradientsExplainer

        module = _module(runtime, files.get("explainer_module.pt"))
        settings = policy.explanation.gradient.model_copy(update={"steps": options["steps"]})
        explainer = IntegratedGradientsExplainer(
            module.forward,
            encoder,
            np.load(io.BytesIO(files["background.npy"])),
            settings,
            tolerance=policy.explanation.gradient.tolerance,
            output_space=_space(runtime),
        )
        explainer.module = module.module
        return explainer
    if method == "kernel_shap":
        from guarded_serving.explain.kernel import KernelShapExplainer

        return KernelShapExplainer(
            runtime,
            encoder,
            np.load(io.BytesIO(files["background.npy"])),
            policy.explanation.kernel,
        )
    raise ConfigError(f"unknown explanation method {method!r} in the manifest")


def _sklearn_tree(
    runtime: Any, encoder: TabularEncoder, train: ModelInput, check: ModelInput
) -> tuple[ExplainerChoice | None, str]:
    from guarded_serving.explain.tree import SklearnTreeExplainer, column_groups

    estimator = runtime.estimator
    last = estimator[-1] if hasattr(estimator, "steps") else estimator
    name = type(last).__name__
    if name not in _SKLEARN_TREES:
        return None, f"{name} is not a tree ensemble shap explains exactly"
    if getattr(last, "is_categorical_", None) is not None and np.any(last.is_categorical_):
        return None, "native categorical splits are not supported by TreeSHAP; one-hot encode"
    transform = estimator[:-1].transform if hasattr(estimator, "steps") else (lambda f: f)
    try:
        groups = column_groups(transform, encoder, train)
    except ValueError as exc:
        return None, str(exc)

    candidates = {"log_odds": getattr(last, "decision_function", None),
                  "probability": lambda z: last.predict_proba(z)[:, 1]}  # fmt: skip
    for space, target in candidates.items():
        if target is None:
            continue
        explainer = SklearnTreeExplainer(runtime, encoder, groups, space)
        values, base = explainer.raw_values(check)
        expected = np.asarray(target(explainer.transformed(check)), dtype=np.float64).reshape(-1)
        error = float(np.max(np.abs(values.sum(axis=1) + base - expected)))
        if error <= 1e-6:
            return ExplainerChoice(
                "tree_shap",
                {"engine": "shap", "column_groups": groups, "output_space": space,
                 "verified_max_error": error},
            ), ""  # fmt: skip
    return None, "TreeSHAP values did not add up to the model output"


def _torch_for(runtime: Runtime, module_bytes: bytes, check: ModelInput) -> Any:
    """The TorchScript module behind an ONNX export, after checking they agree."""
    import torch

    from guarded_serving.runtimes.torch import TorchScriptRuntime

    module = TorchScriptRuntime.from_bytes(module_bytes, output_space=runtime.output_space)
    with torch.no_grad():
        served = runtime.predict_score(check)
        scripted = module.predict_score(check)
    gap = float(np.max(np.abs(served - scripted)))
    if gap > 1e-4:
        raise ConfigError(
            f"the TorchScript module and the ONNX model disagree by {gap:.2g} on the data; "
            "supply the module the ONNX file was exported from"
        )
    return module


def _gradient(
    module: Any,
    policy: Policy,
    train: ModelInput,
    check: ModelInput,
    rng: np.random.Generator,
    torch_module: bytes | None,
    notes: list[str],
) -> ExplainerChoice:
    from guarded_serving.explain.gradient import IntegratedGradientsExplainer

    settings = policy.explanation.gradient
    rows = _sample(len(train), settings.background_rows, rng)
    background = train.matrix[rows]
    steps = settings.steps
    sample = check.matrix[: min(len(check), 32)]
    while True:
        explainer = IntegratedGradientsExplainer(
            module.forward, train.encoder, background,
            settings.model_copy(update={"steps": steps}), settings.tolerance, _space(module),
        )  # fmt: skip
        columns, logits = explainer.column_attributions(sample)
        gap = float(np.max(np.abs(logits - explainer._base - columns.sum(axis=1))))
        # Keep half the tolerance in reserve for rows unlike the check sample.
        if gap <= settings.tolerance / 2 or steps >= _MAX_STEPS:
            break
        steps *= 2
    if gap > settings.tolerance:
        raise ConfigError(
            f"integrated gradients miss completeness by {gap:.3g} even at {steps} steps; "
            "raise explanation.gradient.tolerance or use kernel_shap"
        )
    files = {"background.npy": _npy(background)}
    if torch_module is not None:
        files["explainer_module.pt"] = torch_module
    options = {
        "steps": steps,
        "verified_max_gap": gap,
        "background_sha256": describe_background(background)["sha256"],
    }
    return ExplainerChoice("integrated_gradients", options, files, notes)


def _module(runtime: Runtime, module_bytes: bytes | None) -> Any:
    """The TorchScript runtime gradients are taken through."""
    if module_bytes is None:
        return runtime
    from guarded_serving.runtimes.torch import TorchScriptRuntime

    return TorchScriptRuntime.from_bytes(module_bytes, output_space=runtime.output_space)


def _space(runtime: Runtime) -> str:
    return "log_odds" if runtime.output_space == "margin" else "probability"


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(n, k), replace=False))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
