"""Wrap a trained model: check it against its policy and data, fit its guards and
explainer, seal everything, and register it in BentoML's model store.

This is the one way a model enters the server: ``guarded-serving wrap`` calls
:func:`wrap_file`, and the reference recipes call :func:`wrap_model` exactly as a
user's model is wrapped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import pandas as pd

from guarded_serving import vault
from guarded_serving.encoding import TabularEncoder, TensorEncoder, encoder_for
from guarded_serving.errors import ConfigError, InvalidInputs
from guarded_serving.explain import select
from guarded_serving.guards.anomaly import KNNAnomalyDetector
from guarded_serving.guards.schema import SchemaGuard
from guarded_serving.policy import Policy
from guarded_serving.runtimes.base import RUNTIME_KINDS, ModelInput, load_runtime

logger = logging.getLogger(__name__)

ARTIFACT_FILE = "artifact.sealed"
POLICY_FILE = "policy.yaml"
MANIFEST_FILE = "manifest.json"
STORE_LABEL = "guarded-serving"
_LIBRARIES = ("guarded-serving", "bentoml", "numpy", "scikit-learn", "xgboost", "shap",
              "onnxruntime", "torch", "skops")  # fmt: skip
_MAX_CHECK_ROWS = 64
_MIN_CALIBRATION_ROWS = 10


@dataclass(frozen=True)
class WrapResult:
    tag: str
    """The registered model, ``name:version``."""
    manifest: dict[str, Any]
    """Hashes, library versions, evaluation and calibration figures, explainer."""


def wrap_model(
    *,
    policy: Policy,
    runtime: str,
    model_bytes: bytes,
    train: pd.DataFrame | np.ndarray,
    provider: vault.KeyProvider,
    calibration: pd.DataFrame | np.ndarray | None = None,
    runtime_options: Mapping[str, Any] | None = None,
    torch_module: bytes | None = None,
    figures: Mapping[str, Any] | None = None,
    holdout: pd.DataFrame | np.ndarray | None = None,
    labels: Mapping[str, str] | None = None,
    seed: int = 0,
) -> WrapResult:
    """Check, fit, seal and register one model.

    Args:
        policy: The model's validated policy.
        runtime: Kind of ``model_bytes``: one of ``xgboost``, ``sklearn``, ``onnx``,
            ``torchscript``.
        model_bytes: The serialized model.
        train: A sample of training rows: a data frame with the policy's features as
            columns, or for tensor policies an array ``(rows, *input.shape)``. The
            anomaly detector's reference and the explainer's background.
        provider: Master key provider that wraps the artifact's data key.
        calibration: Held-out in-distribution rows that set the guard thresholds and
            verify the explainer; a seeded fifth of ``train`` when omitted.
        runtime_options: Kind-specific options (scikit-learn: ``serialization`` and
            ``trusted_types``).
        torch_module: TorchScript module an ONNX model was exported from, for gradients.
        figures: Evaluation figures to keep in the manifest (test AUC and the like).
        holdout: Optional test rows on which the guards' flag rates are measured.
        labels: Extra BentoML labels (servers can select models by label).
        seed: Seed of every sample drawn here.

    Raises:
        ConfigError: The model, the policy and the data do not fit together; the
            message says where.
    """
    if runtime not in RUNTIME_KINDS:
        raise ConfigError(f"unknown model kind {runtime!r} (known: {', '.join(RUNTIME_KINDS)})")
    encoder = encoder_for(policy)
    if calibration is None:
        train, calibration = _split(train, seed)
    if len(train) <= policy.guards.anomaly.neighbours or len(calibration) < _MIN_CALIBRATION_ROWS:
        raise ConfigError(
            f"need more than {policy.guards.anomaly.neighbours} training rows and at least "
            f"{_MIN_CALIBRATION_ROWS} calibration rows (got {len(train)} and {len(calibration)})"
        )
    train_in = _model_input(train, policy, encoder, "training data")
    calibration_in = _model_input(calibration, policy, encoder, "calibration data")
    check = ModelInput(calibration_in.records[:_MAX_CHECK_ROWS], encoder)

    options = dict(runtime_options or {})
    loaded = load_runtime(runtime, model_bytes, encoder, policy.output.model_output, options)
    try:
        scores = loaded.predict_score(check)
    except Exception as exc:  # noqa: BLE001 - any failure here means the model does not fit
        raise ConfigError(
            f"the model failed on the policy's inputs ({exc.__class__.__name__}); check that "
            "it takes what the policy declares"
        ) from None
    _check_scores(scores, loaded.output_space)

    anomaly = policy.guards.anomaly
    detector = KNNAnomalyDetector(
        neighbours=anomaly.neighbours,
        seed=seed,
        # Wide tensor rows cost more per reference row; a smaller sample keeps memory
        # and latency near the tabular models'.
        max_reference_rows=4000 if policy.is_tensor else 20_000,
    )
    detector.fit(train_in.matrix, encoder.numeric_mask)
    detector.calibrate(calibration_in.matrix, anomaly.target_fpr)
    holdout_rate = None
    if holdout is not None:
        holdout_in = _model_input(holdout, policy, encoder, "holdout data")
        holdout_rate = float(np.mean(detector.score(holdout_in.matrix) > detector.threshold_))

    explainer = select.choose(
        loaded, policy, train_in, check, torch_module=torch_module, seed=seed
    )

    with bentoml.models.create(
        policy.model, labels={STORE_LABEL: "true", **dict(labels or {})}
    ) as model:
        version = model.tag.version
        manifest = {
            "format": 1,
            "name": policy.model,
            "version": version,
            "runtime": runtime,
            "runtime_options": options,
            "output_space": loaded.output_space,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "key_id": provider.key_id,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "libraries": _library_versions(),
            "figures": dict(figures or {}),
            "data": _data_summary(policy, train_in, calibration_in),
            "explainer": explainer.manifest(),
            "calibration": {
                "anomaly": {
                    "method": "knn_distance",
                    "neighbours": detector.neighbours,
                    "threshold": detector.threshold_,
                    "target_fpr": detector.target_fpr_,
                    "calibration_rows": detector.calibration_rows_,
                    "calibration_fpr": detector.calibration_fpr_,
                    "reference_rows": int(detector.reference_.shape[0]),
                    "holdout_flag_rate": holdout_rate,
                }
            },
        }
        policy_text = policy.to_yaml_text()
        plaintext = vault.pack(
            {
                "model.bin": model_bytes,
                "anomaly.npz": detector.to_bytes(),
                POLICY_FILE: policy_text.encode(),
                MANIFEST_FILE: json.dumps(manifest, sort_keys=True).encode(),
                **explainer.files,
            }
        )
        sealed = vault.seal(plaintext, name=policy.model, version=version, provider=provider)
        manifest["artifact_sha256"] = hashlib.sha256(sealed).hexdigest()
        Path(model.path_of(ARTIFACT_FILE)).write_bytes(sealed)
        # Readable copies for operators; the server trusts only the sealed ones.
        Path(model.path_of(POLICY_FILE)).write_text(policy_text, encoding="utf-8")
        Path(model.path_of(MANIFEST_FILE)).write_text(
            json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8"
        )
        model.info.metadata.update({"runtime": runtime, "key_id": provider.key_id, "format": 1})
    logger.info("registered %s", model.tag, extra={"event": "model.registered"})
    return WrapResult(tag=str(model.tag), manifest=manifest)


def wrap_file(
    model_path: str | Path,
    policy_path: str | Path,
    data_path: str | Path,
    provider: vault.KeyProvider,
    *,
    torch_module_path: str | Path | None = None,
    trust: bool = False,
    labels: Mapping[str, str] | None = None,
    name: str | None = None,
) -> WrapResult:
    """Wrap a model file: what ``guarded-serving wrap`` runs.

    The kind is read from the file: ``.json``/``.ubj`` xgboost, ``.onnx``,
    ``.skops`` or ``.joblib``/``.pkl`` scikit-learn, ``.pt``/``.pth`` TorchScript.

    Args:
        trust: For ``.skops`` files, accept the object types the file declares
            (they are listed in the manifest); for joblib/pickle files, confirm that the
            file is trusted, since loading one runs code.
        labels: Extra BentoML labels.
        name: Register under this name instead of the policy's ``model``.
    """
    model_path = Path(model_path)
    policy = Policy.from_file(policy_path).renamed(name)
    kind, options = detect_kind(model_path, trust=trust)
    module = Path(torch_module_path).read_bytes() if torch_module_path else None
    return wrap_model(
        policy=policy,
        runtime=kind,
        model_bytes=model_path.read_bytes(),
        train=read_table(data_path),
        provider=provider,
        runtime_options=options,
        torch_module=module,
        labels=labels,
    )


def detect_kind(path: Path, trust: bool = False) -> tuple[str, dict[str, Any]]:
    """The runtime kind of a model file, and the options it needs."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".ubj"):
        return "xgboost", {}
    if suffix == ".onnx":
        return "onnx", {}
    if suffix in (".pt", ".pth"):
        return "torchscript", {}
    if suffix == ".skops":
        import skops.io

        types = skops.io.get_untrusted_types(file=str(path))
        if types and not trust:
            raise ConfigError(
                f"{path.name} holds types skops does not trust by default ({', '.join(types)}); "
                "check them and pass --trust to accept them"
            )
        return "sklearn", {"serialization": "skops", "trusted_types": sorted(types)}
    if suffix in (".joblib", ".pkl", ".pickle"):
        if not trust:
            raise ConfigError(
                f"{path.name} is a pickle, and loading one runs code: pass --trust if it comes "
                "from you, or save the model with skops"
            )
        return "sklearn", {"serialization": "joblib"}
    raise ConfigError(
        f"cannot tell the model kind of {path.name}: use .json/.ubj (xgboost), .onnx, "
        ".skops/.joblib (scikit-learn) or .pt (TorchScript)"
    )


def read_table(path: str | Path) -> pd.DataFrame:
    """A data sample from CSV or Parquet."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, skipinitialspace=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read data {path}: {exc.__class__.__name__}") from None
    raise ConfigError(f"data {path.name}: use .csv or .parquet")


def _split(data: Any, seed: int) -> tuple[Any, Any]:
    if len(data) < 20:
        raise ConfigError(f"need at least 20 data rows to fit and calibrate (got {len(data)})")
    order = np.random.default_rng(seed).permutation(len(data))
    cut = len(data) - max(len(data) // 5, 10)
    if isinstance(data, pd.DataFrame):
        return data.iloc[order[:cut]], data.iloc[order[cut:]]
    return data[order[:cut]], data[order[cut:]]


def _model_input(
    frame: Any, policy: Policy, encoder: TabularEncoder | TensorEncoder, what: str
) -> ModelInput:
    """Rows of ``frame`` validated against the policy, exactly as requests are."""
    if policy.is_tensor:
        return _tensor_input(frame, policy, encoder, what)
    missing = [name for name in policy.feature_names if name not in frame.columns]
    if missing:
        raise ConfigError(f"{what} lacks the policy's features: {', '.join(missing)}")
    categorical = {f.name for f in policy.features if f.type == "category"}
    records = [
        {k: str(v) if k in categorical and isinstance(v, bool | np.bool_) else _plain(v)
         for k, v in row.items()}
        for row in frame[policy.feature_names].to_dict("records")
    ]  # fmt: skip
    guard = SchemaGuard(policy, encoder)
    problems = []
    for i, record in enumerate(records):
        try:
            guard.validate_record(record)
        except InvalidInputs as exc:
            problems.append((i, exc.problems[0]))
    if problems:
        row, problem = problems[0]
        field = problem.field.split(".", 1)[-1]
        raise ConfigError(
            f"{what}: {len(problems)} of {len(records)} rows break the policy; first: "
            f"row {row}, {field}: {problem.code}"
        )
    return ModelInput(records, encoder)


def _tensor_input(
    data: Any, policy: Policy, encoder: TabularEncoder | TensorEncoder, what: str
) -> ModelInput:
    array = np.asarray(data, dtype=np.float64)
    shape = tuple(policy.input.shape)
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
        raise ConfigError(
            f"{what}: expected an array of shape (rows, {', '.join(map(str, shape))})"
        )
    guard = SchemaGuard(policy, encoder)
    records = []
    for i, row in enumerate(array):
        try:
            records.append(guard.validate_record(row.tolist()))
        except InvalidInputs as exc:
            problem = exc.problems[0]
            where = problem.field.split("]", 1)[-1] or "the row"
            raise ConfigError(
                f"{what}: row {i} breaks the policy at {where}: {problem.code}"
            ) from None
    return ModelInput(records, encoder)


def _data_summary(policy: Policy, train: ModelInput, calibration: ModelInput) -> dict[str, Any]:
    """Row counts, and for tensor inputs the per-channel spread of the training data
    (the unit of ``robustness.epsilon_unit: std_fraction``)."""
    summary: dict[str, Any] = {"train_rows": len(train), "calibration_rows": len(calibration)}
    spec = policy.input
    if spec is not None:
        tensor = train.tensor.astype(np.float64)
        if spec.range_axis is not None:
            other = tuple(a + 1 for a in range(len(spec.shape)) if a != spec.range_axis)
            summary["channel_std"] = tensor.std(axis=(0, *other)).tolist()
        else:
            summary["channel_std"] = [float(tensor.std())]
    return summary


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers; integral floats of integer columns stay floats."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_scores(scores: np.ndarray, output_space: str) -> None:
    if not np.all(np.isfinite(scores)):
        raise ConfigError("the model returned non-finite scores on the data")
    if output_space == "probability" and (np.any(scores < 0) or np.any(scores > 1)):
        raise ConfigError(
            "the model's scores leave [0, 1]; set output.model_output: margin in the policy"
        )


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions
