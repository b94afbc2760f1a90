"""Draft a policy from a model file and a data sample, for a person to review.

Types, ranges and categories are inferred from the data (numeric ranges widened a
little beyond what was seen, so ordinary new rows pass); where the model names its
inputs, the draft follows the model's order and refuses a data sample that lacks
one. Protected attributes are never guessed: the user names the columns, and the
draft lists the groups seen in them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from guarded_serving.errors import ConfigError
from guarded_serving.policy import Policy, describe_errors
from guarded_serving.wrap import detect_kind, read_table

# Numeric ranges are widened by this share of the observed span on each side.
RANGE_MARGIN = 0.1
# A column with at most this many distinct strings becomes a category.
MAX_CATEGORIES = 200

_HEADER = """\
# Draft policy for {name}, inferred from {data} ({rows} rows).
# Review every range and category list: they bound what the server accepts.
# Protected attributes are never guessed: only the columns named with --protected are
# listed; requests send them as 'context', beside the features, never to the model.
"""


def draft_policy(
    model_path: Path,
    data_path: Path,
    name: str,
    exclude: list[str],
    protected: list[str] | None = None,
    trust: bool = False,
) -> Policy:
    """A validated draft policy for ``model_path`` over the columns of ``data_path``.

    Args:
        exclude: Columns that are neither features nor protected (the label, ids);
            each must be in the data.
        protected: Columns the user names as protected attributes; their groups are
            read from the data, and they never become features.
    """
    frame = read_table(data_path)
    protected = list(protected or [])
    missing = [c for c in protected if c not in frame.columns]
    if missing:
        raise ConfigError(f"the data has no column {', '.join(missing)} to protect")
    absent = [c for c in exclude if c and c not in frame.columns]
    if absent:
        raise ConfigError(f"the data has no column {', '.join(absent)} to leave out")
    attributes = [
        {"name": c, "groups": sorted({str(v) for v in frame[c].dropna()})} for c in protected
    ]
    frame = frame.drop(columns=[c for c in [*exclude, *protected] if c])
    names = model_input_names(model_path, trust)
    if names is not None:
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise ConfigError(f"the data lacks the model's inputs: {', '.join(missing)}")
        frame = frame[names]
    features = [_feature(str(column), frame[column]) for column in frame.columns]
    data = {
        "model": name,
        "description": "",
        "features": features,
        "protected_attributes": attributes,
        "output": {"kind": "binary", "positive_label": "positive", "negative_label": "negative"},
    }
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"cannot draft a valid policy: {describe_errors(exc)}") from None


def draft_policy_text(
    model_path: Path,
    data_path: Path,
    name: str,
    exclude: list[str],
    protected: list[str] | None = None,
    trust: bool = False,
) -> str:
    policy = draft_policy(model_path, data_path, name, exclude, protected, trust)
    body = policy.model_dump(mode="json", exclude_defaults=False)
    rows = len(read_table(data_path))
    text = _HEADER.format(name=name, data=data_path.name, rows=rows)
    return text + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def model_input_names(model_path: Path, trust: bool = False) -> list[str] | None:
    """The input feature names a model file declares, if it declares them."""
    kind, options = detect_kind(model_path, trust=trust)
    if kind == "xgboost":
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(model_path))
        names = booster.feature_names
        # Names with '=' are one-hot columns: the policy's features come from the data.
        return None if not names or any("=" in n for n in names) else list(names)
    if kind == "sklearn":
        estimator = _load_sklearn(model_path, options)
        names = getattr(estimator, "feature_names_in_", None)
        return None if names is None else [str(n) for n in names]
    if kind == "onnx":
        import onnxruntime as ort

        inputs = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        names = [i.name for i in inputs.get_inputs()]
        return names if len(names) > 1 else None
    return None


def _load_sklearn(path: Path, options: dict[str, Any]) -> Any:
    if options["serialization"] == "skops":
        import skops.io

        return skops.io.load(path, trusted=options["trusted_types"])
    import joblib

    return joblib.load(path)


def _feature(name: str, column: pd.Series) -> dict[str, Any]:
    values = column.dropna()
    if values.empty:
        raise ConfigError(f"column {name} has no values to infer a type from")
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        categories = sorted({str(v) for v in values})
        if len(categories) > MAX_CATEGORIES:
            raise ConfigError(
                f"column {name} has {len(categories)} distinct values; too many for a category"
            )
        return {"name": name, "type": "category", "categories": categories}
    numbers = values.astype(np.float64)
    integral = bool(np.all(np.equal(np.floor(numbers), numbers)))
    low, high = float(numbers.min()), float(numbers.max())
    margin = (high - low) * RANGE_MARGIN
    low, high = low - margin, high + margin
    if float(numbers.min()) >= 0:
        low = max(low, 0.0)
    if integral:
        low, high = math.floor(low), math.ceil(high)
    return {"name": name, "type": "integer" if integral else "float", "min": low, "max": high}
