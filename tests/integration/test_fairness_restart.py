"""The fairness accumulator behind a real server equals fairlearn, across a restart."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, selection_rate, true_positive_rate

from guarded_serving.local_server import LocalServer
from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk

pytestmark = pytest.mark.integration


def _fairlearn_figures(frame: pd.DataFrame, attribute: str) -> dict:
    """Per-group selection rate and TPR, and the disparity figures, by fairlearn."""
    selection = MetricFrame(
        metrics=selection_rate,
        y_true=frame["label"],
        y_pred=frame["predicted"],
        sensitive_features=frame[attribute],
    )
    labelled = frame.dropna(subset=["label"])
    tpr = MetricFrame(
        metrics=true_positive_rate,
        y_true=labelled["label"].astype(int),
        y_pred=labelled["predicted"],
        sensitive_features=labelled[attribute],
    )
    return {
        "selection_rate": selection.by_group.to_dict(),
        "true_positive_rate": tpr.by_group.to_dict(),
        "disparate_impact_ratio": selection.ratio(method="between_groups"),
        "demographic_parity_difference": selection.difference(method="between_groups"),
        "equal_opportunity_difference": tpr.difference(method="between_groups"),
    }


def _assert_matches(report: dict, frame: pd.DataFrame) -> None:
    attributes = report["models"]["credit_risk"]["attributes"]
    for attribute in ("sex", "age_band"):
        expected = _fairlearn_figures(frame, attribute)
        got = attributes[attribute]
        for group, rate in expected["selection_rate"].items():
            assert got["groups"][group]["selection_rate"] == pytest.approx(rate, abs=1e-9)
            assert got["groups"][group]["n"] == int((frame[attribute] == group).sum())
        for group, rate in expected["true_positive_rate"].items():
            assert got["groups"][group]["true_positive_rate"] == pytest.approx(rate, abs=1e-9)
        for name in (
            "disparate_impact_ratio",
            "demographic_parity_difference",
            "equal_opportunity_difference",
        ):
            assert got[name] == pytest.approx(expected[name], abs=1e-9), name


def test_accumulator_equals_fairlearn_before_and_after_restart(server_env, api_keys, tmp_path):
    policy = Policy.from_file(credit_risk.POLICY_FILE)
    _, _, test = credit_risk.split(credit_risk.load_german_credit(), policy)
    records = test.features.to_dict("records")
    context = test.context.to_dict("records")
    truth = ["good" if t else "bad" for t in test.target]
    headers = {"Authorization": f"Bearer {api_keys['alice']}"}
    env = server_env(tmp_path)

    with LocalServer(env=env, cwd=tmp_path) as first:
        client = httpx.Client(base_url=first.url, headers=headers, timeout=30)
        predictions = []
        for start in range(0, len(records), 64):
            reply = client.post(
                "/predict",
                json={
                    "records": records[start : start + 64],
                    "context": context[start : start + 64],
                },
            )
            assert reply.status_code == 200, reply.text
            predictions.extend(reply.json()["predictions"])
        # Labels for the first half arrive before the restart, the rest after it.
        half = len(predictions) // 2
        reply = client.post(
            "/feedback",
            json={
                "labels": [
                    {"id": p["id"], "label": y}
                    for p, y in zip(predictions[:half], truth[:half], strict=True)
                ]
            },
        )
        assert reply.json()["accepted"] == half

        frame = pd.DataFrame(context)
        frame["predicted"] = [int(p["label"] == "good") for p in predictions]
        frame["label"] = [int(y == "good") for y in truth[:half]] + [np.nan] * (len(truth) - half)
        before = client.get("/fairness").json()
        _assert_matches(before, frame)
        assert before["complete"] is True

    with LocalServer(env=env, cwd=tmp_path) as second:
        client = httpx.Client(base_url=second.url, headers=headers, timeout=30)
        after_restart = client.get("/fairness").json()
        assert after_restart["models"] == before["models"]

        reply = client.post(
            "/feedback",
            json={
                "labels": [
                    {"id": p["id"], "label": y}
                    for p, y in zip(predictions[half:], truth[half:], strict=True)
                ]
            },
        )
        assert reply.json()["accepted"] == len(predictions) - half
        frame["label"] = [int(y == "good") for y in truth]
        _assert_matches(client.get("/fairness").json(), frame)
