"""The per-model policy file: inputs, protected attributes, guards, limits, explanations.

A policy is YAML validated by pydantic once, when a model is trained or loaded. It is
the single source for the request schema (``guards/schema.py``), the feature encoding
(``encoding.py``), the guard actions and the fairness thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from guarded_serving.errors import ConfigError

Action = Literal["flag", "reject"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericFeature(_Strict):
    """A number within a closed range; ``integer`` also refuses fractions."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["integer", "float"]
    min: float
    max: float
    description: str = ""

    @model_validator(mode="after")
    def _range_is_ordered(self) -> NumericFeature:
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError(f"feature {self.name}: min and max must be finite")
        if self.min > self.max:
            raise ValueError(
                f"feature {self.name}: min must be <= max (got {self.min} > {self.max})"
            )
        return self


class CategoricalFeature(_Strict):
    """One of a closed list of string codes."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["category"]
    categories: list[str] = Field(min_length=1)
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    """Human-readable meaning of each code, for documentation and reports."""

    @model_validator(mode="after")
    def _categories_are_unique(self) -> CategoricalFeature:
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"feature {self.name}: categories must be unique")
        return self


Feature = Annotated[NumericFeature | CategoricalFeature, Field(discriminator="type")]


class TensorInput(_Strict):
    """A fixed-shape numeric array per record: an image, or a window of sensor readings.

    Values are checked against ``min``/``max``: one number for the whole array, or,
    with ``range_axis``, one per position along that axis (a range per sensor).
    """

    kind: Literal["tensor"] = "tensor"
    shape: list[int] = Field(min_length=1, max_length=3)
    """Shape of one record, without the batch dimension."""
    axes: list[str]
    """A name per dimension (``row``, ``column``; ``cycle``, ``sensor``)."""
    dtype: Literal["float32"] = "float32"
    min: float | list[float]
    max: float | list[float]
    range_axis: int | None = None
    """The axis along which ``min``, ``max`` and ``channel_names`` are given per position."""
    channel_names: list[str] | None = None
    """Names of the positions along ``range_axis`` (sensor names)."""
    png_scale: float | None = None
    """Accept a base64 PNG for a 2-D grey image; pixel values are divided by this
    (255 maps 0-255 pixels onto a 0-1 range)."""

    @model_validator(mode="after")
    def _consistent(self) -> TensorInput:
        if any(d < 1 for d in self.shape):
            raise ValueError("input.shape: every dimension must be at least 1")
        if len(self.axes) != len(self.shape):
            raise ValueError("input.axes: one name per dimension of input.shape")
        per_position = isinstance(self.min, list) or isinstance(self.max, list)
        if per_position or self.channel_names is not None:
            if self.range_axis is None or not 0 <= self.range_axis < len(self.shape):
                raise ValueError("input.range_axis must name a dimension for per-position ranges")
            size = self.shape[self.range_axis]
            for name in ("min", "max", "channel_names"):
                value = getattr(self, name)
                if isinstance(value, list) and len(value) != size:
                    raise ValueError(f"input.{name}: one entry per position of the range axis")
        lows, highs = np.asarray(self.min, dtype=float), np.asarray(self.max, dtype=float)
        if not (np.all(np.isfinite(lows)) and np.all(np.isfinite(highs))):
            raise ValueError("input.min and input.max must be finite")
        if np.any(lows > highs):
            raise ValueError("input.min must be <= input.max")
        if self.png_scale is not None and (len(self.shape) != 2 or self.png_scale <= 0):
            raise ValueError("input.png_scale needs a 2-D input and a positive scale")
        return self


class ProtectedAttribute(_Strict):
    """A group membership used for fairness accounting, sent as request context.

    It is never a model input: the model sees only ``features``.
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    groups: list[str] = Field(min_length=2)
    description: str = ""

    @model_validator(mode="after")
    def _groups_are_unique(self) -> ProtectedAttribute:
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"protected attribute {self.name}: groups must be unique")
        return self


class OutputSpec(_Strict):
    """A binary classifier's output: probability of ``positive_label``."""

    kind: Literal["binary"] = "binary"
    positive_label: str
    negative_label: str
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Probability at or above which the positive label is predicted."""
    favourable_label: str | None = None
    """The outcome counted as 'selected' by fairness metrics; the positive label if unset."""
    model_output: Literal["margin", "probability"] | None = None
    """What the model returns for the positive class: a log-odds margin or a probability.
    Unset means the runtime's own kind decides (xgboost and torch: margin; scikit-learn
    and ONNX classifiers: probability)."""

    @model_validator(mode="after")
    def _labels_are_distinct(self) -> OutputSpec:
        if self.positive_label == self.negative_label:
            raise ValueError("output.positive_label and output.negative_label must differ")
        if self.favourable_label not in (None, self.positive_label, self.negative_label):
            raise ValueError("output.favourable_label must be one of the two labels")
        return self

    @property
    def favourable(self) -> str:
        return self.favourable_label or self.positive_label


class AnomalyPolicy(_Strict):
    """Out-of-distribution detection against the training data."""

    enabled: bool = True
    action: Action = "flag"
    target_fpr: float = Field(0.01, gt=0.0, lt=0.5)
    """False-positive rate on held-out in-distribution rows that sets the threshold."""
    neighbours: int = Field(5, ge=1, le=100)
    """k of the k-nearest-neighbour distance score."""
    expose_score: bool = False
    """Put the raw score and threshold in responses; helps attackers, so off by default."""


class GuardsPolicy(_Strict):
    anomaly: AnomalyPolicy = AnomalyPolicy()


class LimitsPolicy(_Strict):
    """Per-client budget, counted in scored rows."""

    rows_per_window: int = Field(600, gt=0)
    window_s: int = Field(60, gt=0)
    max_batch_rows: int = Field(256, gt=0)


class KernelShapPolicy(_Strict):
    """Budget of the model-agnostic KernelSHAP explainer."""

    samples: int = Field(256, ge=16, le=20_000)
    """Coalitions evaluated per explained row."""
    background_rows: int = Field(32, ge=1, le=1000)
    """Training rows that stand in for a missing feature."""
    time_budget_ms: int = Field(2000, gt=0)
    """Per request: rows left when it runs out are answered without attributions."""


class GradientPolicy(_Strict):
    """Integrated gradients from a fixed background set, for differentiable models."""

    steps: int = Field(32, ge=4, le=1024)
    """Points on each straight path from a background row to the input (wrapping raises
    it until the tolerance holds on held-out rows)."""
    background_rows: int = Field(16, ge=1, le=512)
    tolerance: float = Field(0.01, gt=0.0)
    """Largest allowed gap between base value + attributions and the model's output."""
    time_budget_ms: int = Field(10_000, gt=0)
    """Per request: rows left when it runs out are answered without attributions. Keep
    it well inside the server's 30 s request timeout."""


class ExplanationPolicy(_Strict):
    enabled: bool = True
    """Attach attributions to every scored row."""
    method: Literal["auto", "tree_shap", "gradient", "kernel_shap"] = "auto"
    """``auto`` picks exact TreeSHAP for tree ensembles, gradients for torch models and
    KernelSHAP for anything else."""
    kernel: KernelShapPolicy = KernelShapPolicy()
    gradient: GradientPolicy = GradientPolicy()


class FairnessPolicy(_Strict):
    """Thresholds for the fairness accumulator's alerts."""

    min_group_size: int = Field(30, ge=1)
    """Groups with fewer predictions are reported but left out of the disparity figures."""
    min_disparate_impact: float = Field(0.8, ge=0.0, le=1.0)
    max_demographic_parity_difference: float = Field(0.1, ge=0.0, le=1.0)
    max_equal_opportunity_difference: float = Field(0.1, ge=0.0, le=1.0)


class RobustnessPolicy(_Strict):
    """The attack budget a model is hardened for and audited against."""

    epsilon: float = Field(gt=0.0)
    """L-infinity budget of FGSM and PGD."""
    epsilon_unit: Literal["absolute", "std_fraction"] = "absolute"
    """``absolute``: in input units (0-1 pixels); ``std_fraction``: a fraction of each
    input channel's standard deviation on the training data."""
    pgd_steps: int = Field(10, ge=1, le=1000)
    pgd_step_size: float | None = Field(None, gt=0.0)
    """Per step, in the same unit as ``epsilon``; 2.5 * epsilon / steps if unset."""


class Policy(_Strict):
    """Everything the server needs to know about one model, beside its weights."""

    model: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    features: list[Feature] = Field(default_factory=list)
    """Named tabular features; or leave empty and declare a tensor ``input``."""
    input: TensorInput | None = None
    protected_attributes: list[ProtectedAttribute] = Field(default_factory=list)
    output: OutputSpec
    guards: GuardsPolicy = GuardsPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    explanation: ExplanationPolicy = ExplanationPolicy()
    fairness: FairnessPolicy = FairnessPolicy()
    robustness: RobustnessPolicy | None = None

    @model_validator(mode="after")
    def _names_are_unique(self) -> Policy:
        if bool(self.features) == (self.input is not None):
            raise ValueError("declare either features (tabular) or input (tensor), not both")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique (repeated: {', '.join(dupes)})")
        attrs = [a.name for a in self.protected_attributes]
        repeated = sorted({a for a in attrs if attrs.count(a) > 1})
        if repeated:
            raise ValueError(
                f"protected attribute names must be unique (repeated: {', '.join(repeated)})"
            )
        clash = sorted(set(attrs) & set(names))
        if clash:
            raise ValueError(
                f"protected attributes are request context, not features: {', '.join(clash)}"
            )
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def is_tensor(self) -> bool:
        return self.input is not None

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "policy") -> Policy:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: must be a YAML mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe_errors(exc)}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read policy {path}: {exc.strerror}") from None
        return cls.from_yaml_text(text, source=str(path))

    def to_yaml_text(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def renamed(self, name: str | None) -> Policy:
        """This policy for a model registered as ``name``; itself when ``None``."""
        if name is None:
            return self
        return Policy.model_validate({**self.model_dump(), "model": name})


def describe_errors(exc: ValidationError) -> str:
    """Field paths and messages of a validation error, without the input values."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
