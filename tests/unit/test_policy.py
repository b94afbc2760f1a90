"""The policy file: the reference policy loads; each invalid one is a named ConfigError."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from guarded_serving.errors import ConfigError
from guarded_serving.policy import CategoricalFeature, NumericFeature, Policy
from guarded_serving.recipes.credit_risk import POLICY_FILE

BASE: dict[str, Any] = yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))


def _load_changed(change: Callable[[dict[str, Any]], None]) -> Policy:
    data = copy.deepcopy(BASE)
    change(data)
    return Policy.from_yaml_text(yaml.safe_dump(data, sort_keys=False), source="policy.yaml")


def _feature(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in data["features"] if f["name"] == name)


def test_reference_policy_loads() -> None:
    policy = Policy.from_file(POLICY_FILE)

    assert policy.model == "credit_risk"
    assert len(policy.features) == 18
    assert policy.feature_names[:3] == ["checking_status", "duration_months", "credit_history"]
    assert [a.name for a in policy.protected_attributes] == ["sex", "age_band"]
    assert isinstance(policy.features[0], CategoricalFeature)
    assert isinstance(policy.features[1], NumericFeature)
    assert policy.features[1].type == "integer"
    assert policy.output.favourable == "good"
    assert policy.guards.anomaly.action == "flag"
    assert policy.limits.rows_per_window == 2000


def test_policy_survives_a_yaml_roundtrip() -> None:
    policy = Policy.from_file(POLICY_FILE)

    assert Policy.from_yaml_text(policy.to_yaml_text()) == policy


def _duplicate_feature(data: dict[str, Any]) -> None:
    data["features"].append(copy.deepcopy(_feature(data, "duration_months")))


def _min_above_max(data: dict[str, Any]) -> None:
    _feature(data, "duration_months").update(min=50, max=5)


def _infinite_max(data: dict[str, Any]) -> None:
    _feature(data, "credit_amount")["max"] = float("inf")


def _protected_attribute_is_a_feature(data: dict[str, Any]) -> None:
    data["features"].append({"name": "sex", "type": "category", "categories": ["f", "m"]})


def _repeated_category(data: dict[str, Any]) -> None:
    _feature(data, "savings")["categories"].append("A61")


def _unknown_top_level_key(data: dict[str, Any]) -> None:
    data["limts"] = {"rows_per_window": 5}


def _unknown_nested_key(data: dict[str, Any]) -> None:
    data["limits"]["rows_per_windw"] = 5


def _unknown_feature_key(data: dict[str, Any]) -> None:
    _feature(data, "housing")["colour"] = "blue"


def _unknown_action(data: dict[str, Any]) -> None:
    data["guards"]["anomaly"]["action"] = "block"


def _zero_budget(data: dict[str, Any]) -> None:
    data["limits"]["rows_per_window"] = 0


def _same_labels(data: dict[str, Any]) -> None:
    data["output"]["negative_label"] = "good"
    data["output"]["favourable_label"] = None


def _no_features(data: dict[str, Any]) -> None:
    data["features"] = []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        pytest.param(_duplicate_feature, ["feature names", "duration_months"], id="duplicate"),
        pytest.param(_min_above_max, ["features.1", "duration_months", "min"], id="min>max"),
        pytest.param(_infinite_max, ["features.4", "credit_amount", "finite"], id="inf-max"),
        pytest.param(_protected_attribute_is_a_feature, ["protected", "sex"], id="clash"),
        pytest.param(_repeated_category, ["features.5", "savings", "categories"], id="dup-cat"),
        pytest.param(_unknown_top_level_key, ["limts"], id="unknown-top-key"),
        pytest.param(_unknown_nested_key, ["limits.rows_per_windw"], id="unknown-nested-key"),
        pytest.param(_unknown_feature_key, ["features.12", "colour"], id="unknown-feature-key"),
        pytest.param(_unknown_action, ["guards.anomaly.action"], id="unknown-action"),
        pytest.param(_zero_budget, ["limits.rows_per_window"], id="zero-budget"),
        pytest.param(_same_labels, ["positive_label", "negative_label"], id="same-labels"),
        pytest.param(_no_features, ["features"], id="no-features"),
    ],
)
def test_invalid_policy_is_a_config_error_naming_the_field(
    change: Callable[[dict[str, Any]], None], named: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_changed(change)

    message = caught.value.message
    assert caught.value.code == "config_error"
    assert message.startswith("policy.yaml: ")
    for part in named:
        assert part in message
    # A one-line reason, not pydantic's multi-line dump or a traceback.
    assert "\n" not in message
    assert "Traceback" not in message
    assert "errors.pydantic.dev" not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("model: credit_risk\nfeatures: [1, 2\n", id="unclosed-list"),
        pytest.param("model: x\n  bad: indent\n", id="bad-indent"),
        pytest.param("a: b: c\n", id="mapping-in-scalar"),
    ],
)
def test_bad_yaml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Policy.from_yaml_text(text, source="policy.yaml")

    assert caught.value.message.startswith("policy.yaml: not valid YAML")
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Policy.from_yaml_text(text, source="policy.yaml")

    assert caught.value.message == "policy.yaml: must be a YAML mapping"


def test_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Policy.from_file(tmp_path / "absent.yaml")

    assert "absent.yaml" in caught.value.message
    assert caught.value.__cause__ is None


def test_policy_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    data = copy.deepcopy(BASE)
    _min_above_max(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        Policy.from_file(path)

    assert caught.value.message.startswith(f"{path}: ")
    assert "duration_months" in caught.value.message
