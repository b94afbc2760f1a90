"""Fairness metrics against fairlearn's MetricFrame and scipy's Wilson interval."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, selection_rate, true_positive_rate
from scipy.stats import binomtest

from guarded_serving.fairness import GroupCounts, compute_report, report_for_policies
from guarded_serving.fairness.metrics import wilson_interval
from guarded_serving.policy import FairnessPolicy, Policy, ProtectedAttribute

MODEL = "credit_risk"
ATTRIBUTES = ("sex", "age_band", "region")
EVERY_GROUP = FairnessPolicy(min_group_size=1)


def random_records(seed: int, n: int = 600) -> pd.DataFrame:
    """Seeded records with three protected attributes and group-dependent outcomes."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["female", "male"], n, p=[0.4, 0.6])
    age_band = rng.choice(["<25", "25-60", ">60"], n, p=[0.2, 0.6, 0.2])
    region = rng.choice(["north", "south"], n)
    y_true = rng.integers(0, 2, n)
    base = np.where(sex == "female", 0.45, 0.6) + np.where(age_band == "<25", -0.15, 0.0)
    noisy = np.where(y_true == 1, base + 0.2, base - 0.2)
    y_pred = (rng.random(n) < noisy).astype(int)
    labelled = rng.random(n) < 0.4
    return pd.DataFrame(
        {
            "sex": sex,
            "age_band": age_band,
            "region": region,
            "y_true": y_true,
            "y_pred": y_pred,
            "labelled": labelled,
        }
    )


def counts_of(df: pd.DataFrame, all_labelled: bool) -> list[GroupCounts]:
    """Aggregates records into group counts, split over two time windows."""
    out = []
    halves = (df.iloc[: len(df) // 2], df.iloc[len(df) // 2 :])
    for half in halves:
        for attribute in ATTRIBUTES:
            for group, rows in half.groupby(attribute):
                lab = rows if all_labelled else rows[rows["labelled"]]
                out.append(
                    GroupCounts(
                        MODEL,
                        attribute,
                        str(group),
                        n=len(rows),
                        selected=int(rows["y_pred"].sum()),
                        labelled=len(lab),
                        label_pos=int(lab["y_true"].sum()),
                        true_pos=int(((lab["y_true"] == 1) & (lab["y_pred"] == 1)).sum()),
                        false_pos=int(((lab["y_true"] == 0) & (lab["y_pred"] == 1)).sum()),
                    )
                )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_fairlearn_when_every_prediction_is_labelled(seed: int) -> None:
    df = random_records(seed)

    report = compute_report(counts_of(df, all_labelled=True), policy=EVERY_GROUP)

    for attribute in ATTRIBUTES:
        frame = MetricFrame(
            metrics={"selection_rate": selection_rate, "tpr": true_positive_rate},
            y_true=df["y_true"],
            y_pred=df["y_pred"],
            sensitive_features=df[attribute],
        )
        got = report.models[MODEL].attributes[attribute]
        for group, row in frame.by_group.iterrows():
            assert got.groups[group].selection_rate == pytest.approx(
                row["selection_rate"], abs=1e-9
            )
            assert got.groups[group].true_positive_rate == pytest.approx(row["tpr"], abs=1e-9)
        difference = frame.difference(method="between_groups")
        ratio = frame.ratio(method="between_groups")
        assert got.demographic_parity_difference == pytest.approx(
            difference["selection_rate"], abs=1e-9
        )
        assert got.disparate_impact_ratio == pytest.approx(ratio["selection_rate"], abs=1e-9)
        assert got.equal_opportunity_difference == pytest.approx(difference["tpr"], abs=1e-9)


@pytest.mark.parametrize("seed", [3, 4])
def test_partial_labels_rate_selection_on_all_and_tpr_on_labelled(seed: int) -> None:
    df = random_records(seed)
    labelled = df[df["labelled"]]

    report = compute_report(counts_of(df, all_labelled=False), policy=EVERY_GROUP)

    for attribute in ATTRIBUTES:
        everything = MetricFrame(
            metrics=selection_rate,
            y_true=df["y_true"],
            y_pred=df["y_pred"],
            sensitive_features=df[attribute],
        )
        subset = MetricFrame(
            metrics=true_positive_rate,
            y_true=labelled["y_true"],
            y_pred=labelled["y_pred"],
            sensitive_features=labelled[attribute],
        )
        got = report.models[MODEL].attributes[attribute]
        for group, rate in everything.by_group.items():
            assert got.groups[group].selection_rate == pytest.approx(rate, abs=1e-9)
            assert got.groups[group].n == int((df[attribute] == group).sum())
        for group, tpr in subset.by_group.items():
            assert got.groups[group].true_positive_rate == pytest.approx(tpr, abs=1e-9)
            assert got.groups[group].labelled == int((labelled[attribute] == group).sum())
        assert got.demographic_parity_difference == pytest.approx(
            everything.difference(method="between_groups"), abs=1e-9
        )
        assert got.equal_opportunity_difference == pytest.approx(
            subset.difference(method="between_groups"), abs=1e-9
        )


def test_small_groups_are_reported_but_left_out_of_disparities() -> None:
    counts = [
        GroupCounts(MODEL, "age_band", "<25", n=10, selected=1),
        GroupCounts(MODEL, "age_band", "25-60", n=100, selected=50),
        GroupCounts(MODEL, "age_band", ">60", n=40, selected=30),
    ]

    got = compute_report(counts, policy=FairnessPolicy(min_group_size=30))
    attr = got.models[MODEL].attributes["age_band"]

    assert attr.excluded_groups == ("<25",)
    assert attr.groups["<25"].eligible is False
    assert attr.groups["<25"].selection_rate == pytest.approx(0.1)
    assert attr.demographic_parity_difference == pytest.approx(0.75 - 0.5)
    assert attr.disparate_impact_ratio == pytest.approx(0.5 / 0.75)

    only_one = compute_report(counts, policy=FairnessPolicy(min_group_size=50))
    attr = only_one.models[MODEL].attributes["age_band"]
    assert attr.excluded_groups == ("<25", ">60")
    assert attr.demographic_parity_difference is None
    assert attr.disparate_impact_ratio is None
    assert attr.equal_opportunity_difference is None
    assert attr.alerts == ()


def test_alerts_fire_past_each_threshold() -> None:
    counts = [
        GroupCounts(
            MODEL, "sex", "female", n=100, selected=30, labelled=50, label_pos=20, true_pos=10
        ),
        GroupCounts(
            MODEL, "sex", "male", n=100, selected=60, labelled=50, label_pos=20, true_pos=18
        ),
    ]
    policy = FairnessPolicy(
        min_group_size=30,
        min_disparate_impact=0.8,
        max_demographic_parity_difference=0.1,
        max_equal_opportunity_difference=0.1,
    )

    attr = compute_report(counts, policy=policy).models[MODEL].attributes["sex"]

    by_metric = {a.metric: a for a in attr.alerts}
    assert by_metric["disparate_impact_ratio"].value == pytest.approx(0.5)
    assert by_metric["disparate_impact_ratio"].threshold == 0.8
    assert by_metric["demographic_parity_difference"].value == pytest.approx(0.3)
    assert by_metric["equal_opportunity_difference"].value == pytest.approx(0.9 - 0.5)

    lenient = FairnessPolicy(
        min_group_size=30,
        min_disparate_impact=0.5,
        max_demographic_parity_difference=0.3,
        max_equal_opportunity_difference=0.4,
    )
    assert compute_report(counts, policy=lenient).models[MODEL].attributes["sex"].alerts == ()


def test_no_selection_anywhere_gives_no_ratio_and_no_tpr() -> None:
    counts = [
        GroupCounts(MODEL, "sex", "female", n=40, selected=0, labelled=5, label_pos=0),
        GroupCounts(MODEL, "sex", "male", n=40, selected=0),
    ]

    attr = compute_report(counts).models[MODEL].attributes["sex"]

    assert attr.disparate_impact_ratio is None
    assert attr.demographic_parity_difference == 0.0
    assert attr.equal_opportunity_difference is None
    assert attr.groups["female"].true_positive_rate is None


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (40, 61), (1, 1), (7, 1000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")

    low, high = wilson_interval(k, n)

    assert low == pytest.approx(expected.low, abs=1e-9)
    assert high == pytest.approx(expected.high, abs=1e-9)


def test_wilson_interval_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_declared_attributes_shape_the_report() -> None:
    declared = {
        MODEL: [ProtectedAttribute(name="sex", groups=["female", "male", "other"])],
        "pneumonia": [],
    }
    counts = [
        GroupCounts(MODEL, "sex", "female", n=40, selected=20),
        GroupCounts(MODEL, "sex", "male", n=40, selected=24),
        GroupCounts(MODEL, "sex", "unknown", n=3, selected=1),
        GroupCounts(MODEL, "undeclared", "a", n=40, selected=1),
        GroupCounts("other_model", "sex", "x", n=1, selected=1),
    ]

    report = compute_report(counts, attributes=declared)

    assert list(report.models) == ["credit_risk", "other_model", "pneumonia"]
    attr = report.models[MODEL].attributes
    assert list(attr) == ["sex"]
    assert list(attr["sex"].groups) == ["female", "male", "other", "unknown"]
    assert attr["sex"].groups["other"].n == 0
    assert attr["sex"].groups["other"].selection_rate is None
    assert attr["sex"].groups["other"].selection_rate_ci95 is None
    assert attr["sex"].excluded_groups == ("other", "unknown")
    assert report.models["pneumonia"].attributes == {}
    assert list(report.models["other_model"].attributes["sex"].groups) == ["x"]


def test_to_dict_has_the_documented_json_shape() -> None:
    counts = [
        GroupCounts(
            MODEL,
            "sex",
            "female",
            n=61,
            selected=40,
            labelled=61,
            label_pos=30,
            true_pos=24,
            false_pos=16,
        ),
        GroupCounts(MODEL, "sex", "male", n=70, selected=30, labelled=0),
    ]

    data = json.loads(json.dumps(compute_report(counts).to_dict()))

    sex = data["models"][MODEL]["attributes"]["sex"]
    female = sex["groups"]["female"]
    assert female["n"] == 61
    assert female["selected"] == 40
    assert female["selection_rate"] == pytest.approx(40 / 61)
    assert len(female["selection_rate_ci95"]) == 2
    assert female["labelled"] == 61
    assert female["true_positive_rate"] == pytest.approx(0.8)
    assert female["eligible"] is True
    assert sex["groups"]["male"]["true_positive_rate"] is None
    assert sex["equal_opportunity_difference"] is None
    assert sex["disparate_impact_ratio"] == pytest.approx((30 / 70) / (40 / 61))
    assert {a["metric"] for a in sex["alerts"]} == {
        "disparate_impact_ratio",
        "demographic_parity_difference",
    }
    assert sex["excluded_groups"] == []


def test_report_for_policies_uses_each_models_thresholds() -> None:
    policy = Policy.model_validate(
        {
            "model": MODEL,
            "features": [{"name": "amount", "type": "float", "min": 0, "max": 1}],
            "protected_attributes": [{"name": "sex", "groups": ["female", "male"]}],
            "output": {"positive_label": "good", "negative_label": "bad"},
            "fairness": {"min_group_size": 100, "min_disparate_impact": 0.5},
        }
    )
    counts = [
        GroupCounts(MODEL, "sex", "female", n=100, selected=30),
        GroupCounts(MODEL, "sex", "male", n=99, selected=60),
        GroupCounts("unlisted", "sex", "a", n=30, selected=10),
        GroupCounts("unlisted", "sex", "b", n=30, selected=20),
    ]

    report = report_for_policies(counts, {MODEL: policy})

    sex = report.models[MODEL].attributes["sex"]
    assert sex.excluded_groups == ("male",)
    assert sex.disparate_impact_ratio is None
    unlisted = report.models["unlisted"].attributes["sex"]
    assert unlisted.disparate_impact_ratio == pytest.approx(0.5)
    assert [(m, a, x.metric) for m, a, x in report.alerts] == [
        ("unlisted", "sex", "disparate_impact_ratio"),
        ("unlisted", "sex", "demographic_parity_difference"),
    ]
