"""Fairness stage, reporting: group metrics, disparities and alerts from stored counts.

Pure functions over :class:`GroupCounts`; no I/O. The figures match fairlearn's
``MetricFrame`` with ``selection_rate`` and ``true_positive_rate`` when every
prediction carries a label:

* selection rate of a group = selected / n, over **all** its predictions;
* true positive rate of a group = true positives / labelled positives, over its
  **labelled** predictions only (labels arrive later and not for every record, so
  the two rates can rest on different populations);
* demographic parity difference = max - min selection rate over eligible groups
  (fairlearn's ``difference(method="between_groups")``);
* disparate impact ratio = min / max selection rate over eligible groups
  (fairlearn's ``ratio(method="between_groups")``);
* equal opportunity difference = max - min true positive rate over eligible groups
  that have one.

A group is eligible when it has at least ``FairnessPolicy.min_group_size``
predictions; a disparity needs two eligible groups, otherwise it is ``None``.
Known limitation: eligibility counts predictions, not labels, so a group can take
part in the equal opportunity difference with very few labelled positives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guarded_serving.policy import FairnessPolicy, Policy, ProtectedAttribute

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""


@dataclass(frozen=True, slots=True)
class GroupCounts:
    """Cumulative counts for one group of one protected attribute of one model.

    Attributes:
        model: Model name.
        attribute: Protected attribute name.
        group: Group within the attribute.
        n: Predictions.
        selected: Predictions with the favourable outcome.
        labelled: Predictions whose true outcome is known.
        label_pos: Labelled predictions whose true outcome is favourable.
        true_pos: Labelled predictions, favourable both predicted and true.
        false_pos: Labelled predictions, favourable predicted but not true.
    """

    model: str
    attribute: str
    group: str
    n: int = 0
    selected: int = 0
    labelled: int = 0
    label_pos: int = 0
    true_pos: int = 0
    false_pos: int = 0


@dataclass(frozen=True, slots=True)
class GroupReport:
    """Rates of one group.

    Attributes:
        n: Predictions.
        selected: Predictions with the favourable outcome.
        selection_rate: ``selected / n``; ``None`` without predictions.
        selection_rate_ci95: Wilson score 95% interval of the selection rate.
        labelled: Predictions with a known true outcome.
        label_positives: Labelled predictions whose true outcome is favourable.
        true_positive_rate: Share of labelled positives predicted favourable;
            ``None`` without labelled positives.
        eligible: Whether the group is large enough for the disparity figures.
    """

    n: int
    selected: int
    selection_rate: float | None
    selection_rate_ci95: tuple[float, float] | None
    labelled: int
    label_positives: int
    true_positive_rate: float | None
    eligible: bool

    def to_dict(self) -> dict[str, Any]:
        """Returns the group's figures as a JSON-ready mapping."""
        ci = self.selection_rate_ci95
        return {
            "n": self.n,
            "selected": self.selected,
            "selection_rate": self.selection_rate,
            "selection_rate_ci95": None if ci is None else [ci[0], ci[1]],
            "labelled": self.labelled,
            "label_positives": self.label_positives,
            "true_positive_rate": self.true_positive_rate,
            "eligible": self.eligible,
        }


@dataclass(frozen=True, slots=True)
class Alert:
    """A disparity past the policy's threshold.

    Attributes:
        metric: ``disparate_impact_ratio``, ``demographic_parity_difference`` or
            ``equal_opportunity_difference``.
        value: The measured disparity.
        threshold: The policy's bound it crossed.
    """

    metric: str
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """Returns the alert as a JSON-ready mapping."""
        return {"metric": self.metric, "value": self.value, "threshold": self.threshold}


@dataclass(frozen=True, slots=True)
class AttributeReport:
    """Groups and disparities of one protected attribute.

    Attributes:
        groups: Report per group: declared groups first, then any others seen.
        disparate_impact_ratio: Lowest over highest eligible selection rate.
        demographic_parity_difference: Highest minus lowest eligible selection rate.
        equal_opportunity_difference: Highest minus lowest eligible true positive
            rate.
        alerts: Disparities past the policy's thresholds.
        excluded_groups: Groups too small to take part in the disparities.
    """

    groups: Mapping[str, GroupReport]
    disparate_impact_ratio: float | None
    demographic_parity_difference: float | None
    equal_opportunity_difference: float | None
    alerts: tuple[Alert, ...]
    excluded_groups: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Returns the attribute's figures as a JSON-ready mapping."""
        return {
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
            "disparate_impact_ratio": self.disparate_impact_ratio,
            "demographic_parity_difference": self.demographic_parity_difference,
            "equal_opportunity_difference": self.equal_opportunity_difference,
            "alerts": [a.to_dict() for a in self.alerts],
            "excluded_groups": list(self.excluded_groups),
        }


@dataclass(frozen=True, slots=True)
class ModelReport:
    """Fairness figures of one model, per protected attribute."""

    attributes: Mapping[str, AttributeReport]

    def to_dict(self) -> dict[str, Any]:
        """Returns the model's figures as a JSON-ready mapping."""
        return {"attributes": {name: a.to_dict() for name, a in self.attributes.items()}}


@dataclass(frozen=True, slots=True)
class FairnessReport:
    """Fairness figures of every reported model."""

    models: Mapping[str, ModelReport]

    @property
    def alerts(self) -> list[tuple[str, str, Alert]]:
        """Every alert as ``(model, attribute, alert)``."""
        return [
            (model, attribute, alert)
            for model, m in self.models.items()
            for attribute, a in m.attributes.items()
            for alert in a.alerts
        ]

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-ready mapping."""
        return {"models": {name: m.to_dict() for name, m in self.models.items()}}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Args:
        successes: Number of successes, ``0 <= successes <= n``.
        n: Number of trials, at least 1.
        z: Standard normal quantile; the default gives a two-sided 95% interval.

    Returns:
        ``(low, high)``, within ``[0, 1]``.

    Raises:
        ValueError: If ``n < 1`` or ``successes`` is outside ``[0, n]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, n] (got {successes} of {n})")

    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def compute_report(
    counts: Iterable[GroupCounts],
    attributes: Mapping[str, Sequence[ProtectedAttribute]] | None = None,
    policy: FairnessPolicy | Mapping[str, FairnessPolicy] | None = None,
) -> FairnessReport:
    """Computes group rates, disparities and alerts.

    Counts for the same model, attribute and group are summed, so per-window rows
    may be passed as they are.

    Args:
        counts: Counts per model, attribute and group.
        attributes: Declared protected attributes per model. A model listed here is
            reported even without counts, with exactly its declared attributes, each
            with its declared groups (zero counts included) followed by any other
            group seen. Models not listed are reported with the attributes and
            groups seen in ``counts``.
        policy: Thresholds: one for every model, or one per model name (a model
            missing from the mapping gets the defaults). ``None`` means defaults.

    Returns:
        The report; ``to_dict()`` gives its JSON form.
    """
    totals = _sum_counts(counts)
    declared = dict(attributes or {})

    by_model: dict[str, dict[str, dict[str, GroupCounts]]] = {}
    for (model, attribute, group), c in totals.items():
        by_model.setdefault(model, {}).setdefault(attribute, {})[group] = c

    models: dict[str, ModelReport] = {}
    for model in sorted(set(by_model) | set(declared)):
        seen = by_model.get(model, {})
        model_policy = _policy_for(policy, model)
        if model in declared:
            layout = [
                (attr.name, _ordered(attr.groups, seen.get(attr.name, {})))
                for attr in declared[model]
            ]
        else:
            layout = [(name, _ordered([], seen[name])) for name in sorted(seen)]

        reports = {}
        for attribute, group_names in layout:
            group_counts = seen.get(attribute, {})
            rows = {g: group_counts.get(g, GroupCounts(model, attribute, g)) for g in group_names}
            reports[attribute] = _attribute_report(rows, model_policy)
        models[model] = ModelReport(attributes=reports)

    return FairnessReport(models=models)


def report_for_policies(
    counts: Iterable[GroupCounts], policies: Mapping[str, Policy]
) -> FairnessReport:
    """Computes the report with each model's declared attributes and thresholds.

    Args:
        counts: Counts per model, attribute and group.
        policies: Policy per model name. Models with counts but no policy are
            reported with default thresholds and the attributes seen.

    Returns:
        The report.
    """
    return compute_report(
        counts,
        attributes={name: p.protected_attributes for name, p in policies.items()},
        policy={name: p.fairness for name, p in policies.items()},
    )


def _sum_counts(counts: Iterable[GroupCounts]) -> dict[tuple[str, str, str], GroupCounts]:
    totals: dict[tuple[str, str, str], GroupCounts] = {}
    for c in counts:
        key = (c.model, c.attribute, c.group)
        previous = totals.get(key)
        if previous is not None:
            c = GroupCounts(
                c.model,
                c.attribute,
                c.group,
                n=previous.n + c.n,
                selected=previous.selected + c.selected,
                labelled=previous.labelled + c.labelled,
                label_pos=previous.label_pos + c.label_pos,
                true_pos=previous.true_pos + c.true_pos,
                false_pos=previous.false_pos + c.false_pos,
            )
        totals[key] = c
    return totals


def _policy_for(
    policy: FairnessPolicy | Mapping[str, FairnessPolicy] | None, model: str
) -> FairnessPolicy:
    if policy is None:
        return FairnessPolicy()
    if isinstance(policy, FairnessPolicy):
        return policy
    return policy.get(model) or FairnessPolicy()


def _ordered(declared: Sequence[str], seen: Mapping[str, GroupCounts]) -> list[str]:
    extra = sorted(g for g in seen if g not in declared)
    return [*declared, *extra]


def _attribute_report(rows: Mapping[str, GroupCounts], policy: FairnessPolicy) -> AttributeReport:
    groups = {name: _group_report(c, policy.min_group_size) for name, c in rows.items()}
    eligible = [g for g in groups.values() if g.eligible]
    excluded = tuple(name for name, g in groups.items() if not g.eligible)

    di = dpd = eod = None
    if len(eligible) >= 2:
        rates = [g.selection_rate for g in eligible if g.selection_rate is not None]
        highest, lowest = max(rates), min(rates)
        dpd = highest - lowest
        di = lowest / highest if highest > 0 else None
        tprs = [g.true_positive_rate for g in eligible if g.true_positive_rate is not None]
        if len(tprs) >= 2:
            eod = max(tprs) - min(tprs)

    alerts = []
    if di is not None and di < policy.min_disparate_impact:
        alerts.append(Alert("disparate_impact_ratio", di, policy.min_disparate_impact))
    if dpd is not None and dpd > policy.max_demographic_parity_difference:
        alerts.append(
            Alert("demographic_parity_difference", dpd, policy.max_demographic_parity_difference)
        )
    if eod is not None and eod > policy.max_equal_opportunity_difference:
        alerts.append(
            Alert("equal_opportunity_difference", eod, policy.max_equal_opportunity_difference)
        )

    return AttributeReport(
        groups=groups,
        disparate_impact_ratio=di,
        demographic_parity_difference=dpd,
        equal_opportunity_difference=eod,
        alerts=tuple(alerts),
        excluded_groups=excluded,
    )


def _group_report(c: GroupCounts, min_group_size: int) -> GroupReport:
    rate = c.selected / c.n if c.n > 0 else None
    ci = wilson_interval(c.selected, c.n) if c.n > 0 else None
    tpr = c.true_pos / c.label_pos if c.label_pos > 0 else None
    return GroupReport(
        n=c.n,
        selected=c.selected,
        selection_rate=rate,
        selection_rate_ci95=ci,
        labelled=c.labelled,
        label_positives=c.label_pos,
        true_positive_rate=tpr,
        eligible=c.n >= min_group_size,
    )
