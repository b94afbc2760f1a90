"""The per-model policy file: inputs, protected attributes, guards, limits, explanations.

A policy is YAML validated by pydantic once, when a model is trained or loaded. It is
the single source for the request schema (``guards/schema.py``), the feature encoding
(``encoding.py``), the guard actions and the fairness thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

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


class ExplanationPolicy(_Strict):
    enabled: bool = True
    """Attach SHAP attributions to every scored row."""


class FairnessPolicy(_Strict):
    """Thresholds for the fairness accumulator's alerts."""

    min_group_size: int = Field(30, ge=1)
    """Groups with fewer predictions are reported but left out of the disparity figures."""
    min_disparate_impact: float = Field(0.8, ge=0.0, le=1.0)
    max_demographic_parity_difference: float = Field(0.1, ge=0.0, le=1.0)
    max_equal_opportunity_difference: float = Field(0.1, ge=0.0, le=1.0)


class Policy(_Strict):
    """Everything the server needs to know about one model, beside its weights."""

    model: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    features: list[Feature] = Field(min_length=1)
    protected_attributes: list[ProtectedAttribute] = Field(default_factory=list)
    output: OutputSpec
    guards: GuardsPolicy = GuardsPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    explanation: ExplanationPolicy = ExplanationPolicy()
    fairness: FairnessPolicy = FairnessPolicy()

    @model_validator(mode="after")
    def _names_are_unique(self) -> Policy:
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
            raise ConfigError(f"{source}: {_describe(exc)}") from None

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


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
