"""Stage 3, validate: each schema rule's code and field, never the offending value."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from guarded_serving.errors import InvalidInputs
from guarded_serving.guards.schema import SchemaGuard
from guarded_serving.policy import Policy
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Outcome, ScoringRequest

_UNSET = object()


def _request(records: Any, context: Any = None, explain: Any = True) -> ScoringRequest:
    # SchemaGuard never reads request.model.
    return ScoringRequest(
        request_id="req-1",
        model=None,  # type: ignore[arg-type]
        api_key=None,
        raw_records=records,
        raw_context=context,
        raw_explain=explain,
    )


@pytest.fixture(scope="module")
def guard(credit_policy: Policy) -> SchemaGuard:
    return SchemaGuard(credit_policy)


def _rejected(guard: SchemaGuard, request: ScoringRequest) -> InvalidInputs:
    with pytest.raises(InvalidInputs) as caught:
        guard(request)
    error = caught.value
    assert error.status_code == 422
    assert request.verdicts[-1].stage == "validate"
    assert request.verdicts[-1].outcome is Outcome.REJECT
    assert request.verdicts[-1].code == error.code
    assert request.inputs is None
    assert request.records == []
    return error


def _problems(error: InvalidInputs) -> set[tuple[str, str]]:
    return {(p.field, p.code) for p in error.problems}


def _client_text(error: InvalidInputs) -> str:
    """Everything a client could read about the error."""
    return str(error) + json.dumps(error.to_dict(request_id="req-1"))


def test_valid_record_passes_and_fills_the_request(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    request = _request([credit_record], explain=False)

    guard(request)

    assert request.records == [credit_record]
    assert request.context == [{}]
    assert request.explain is False
    inputs = request.inputs
    assert isinstance(inputs, ModelInput)
    assert len(inputs) == 1
    assert inputs.records == [credit_record]
    assert inputs.encoder is guard.encoder
    # The one-hot matrix, for runtimes and guards that take one.
    assert inputs.matrix.shape == (1, guard.encoder.n_columns)
    assert inputs.matrix.dtype == np.float32
    np.testing.assert_array_equal(inputs.matrix, guard.encoder.encode([credit_record]))
    # The raw frame, for runtimes that take one: policy order, numbers and categories.
    frame = inputs.frame
    assert list(frame.columns) == guard.policy.feature_names
    assert frame.shape == (1, len(guard.policy.features))
    assert frame.loc[0, "duration_months"] == 12.0
    assert frame["duration_months"].dtype == np.float64
    assert frame.loc[0, "purpose"] == "A43"
    assert frame["purpose"].dtype == object
    assert [(v.stage, v.outcome) for v in request.verdicts] == [("validate", Outcome.PASS)]


def test_valid_context_is_kept_per_row(guard: SchemaGuard, credit_record: dict[str, Any]) -> None:
    context = [
        {"sex": "female", "age_band": "under_25"},
        None,
        {"sex": None, "age_band": "25_and_over"},
    ]
    request = _request([credit_record] * 3, context=context)

    guard(request)

    assert request.context == [
        {"sex": "female", "age_band": "under_25"},
        {},
        {"age_band": "25_and_over"},
    ]
    assert request.inputs is not None and len(request.inputs) == 3
    assert request.inputs.matrix.shape[0] == 3


def test_integral_float_and_range_bounds_are_accepted(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    low = credit_record | {"duration_months": 1, "num_dependents": 0}
    high = credit_record | {"duration_months": 120.0, "credit_amount": 100000}
    request = _request([low, high])

    guard(request)

    assert request.inputs is not None
    column = guard.encoder.feature_columns["duration_months"].start
    assert request.inputs.matrix[:, column].tolist() == [1.0, 120.0]
    assert request.inputs.frame["duration_months"].tolist() == [1.0, 120.0]
    assert request.inputs.frame["num_dependents"].tolist() == [0.0, 1.0]


# (feature, value, code); the value never appears in what the client reads.
RECORD_CASES = [
    ("duration_months", "twelve-xyzzy", "wrong_type"),
    ("duration_months", True, "wrong_type"),
    ("duration_months", [12], "wrong_type"),
    ("checking_status", 7357, "wrong_type"),
    ("duration_months", math.nan, "not_finite"),
    ("credit_amount", math.inf, "not_finite"),
    ("credit_amount", -math.inf, "not_finite"),
    ("duration_months", 12.375, "not_integer"),
    ("duration_months", 98765, "out_of_range"),
    ("installment_rate", 0, "out_of_range"),
    ("credit_amount", -31337, "out_of_range"),
    ("purpose", "A4999", "unknown_category"),
    ("purpose", "a43", "unknown_category"),
]


@pytest.mark.parametrize(("feature", "value", "code"), RECORD_CASES)
def test_bad_feature_value_is_named_by_field_and_code(
    guard: SchemaGuard, credit_record: dict[str, Any], feature: str, value: Any, code: str
) -> None:
    records = [dict(credit_record), credit_record | {feature: value}]

    error = _rejected(guard, _request(records))

    assert _problems(error) == {(f"records[1].{feature}", code)}
    assert (error.code, error.field) == (code, f"records[1].{feature}")
    if len(str(value)) >= 4:  # too short to search for: 0, nan, inf
        assert str(value) not in _client_text(error)


@pytest.mark.parametrize("absent", [_UNSET, None])
def test_missing_feature(
    guard: SchemaGuard, credit_record: dict[str, Any], absent: object
) -> None:
    record = dict(credit_record)
    if absent is _UNSET:
        del record["housing"]
    else:
        record["housing"] = absent

    error = _rejected(guard, _request([record]))

    assert _problems(error) == {("records[0].housing", "missing_field")}


def test_unexpected_field(guard: SchemaGuard, credit_record: dict[str, Any]) -> None:
    record = credit_record | {"favourite_colour_q": "s3cret-value"}

    error = _rejected(guard, _request([record]))

    assert _problems(error) == {("records[0].favourite_colour_q", "unexpected_field")}
    assert "s3cret-value" not in _client_text(error)


@pytest.mark.parametrize("attribute", ["sex", "age_band"])
def test_protected_attribute_in_the_record(
    guard: SchemaGuard, credit_record: dict[str, Any], attribute: str
) -> None:
    record = credit_record | {attribute: "female"}

    error = _rejected(guard, _request([record]))

    assert _problems(error) == {(f"records[0].{attribute}", "protected_attribute_in_features")}


@pytest.mark.parametrize(
    ("context", "problem"),
    [
        ([{"sex": "other-zq"}], ("context[0].sex", "unknown_group")),
        ([{"religion": "female"}], ("context[0].religion", "unexpected_field")),
        ([{"sex": 1}], ("context[0].sex", "wrong_type")),
        (["female"], ("context[0]", "wrong_type")),
        ([{"sex": "female"}, {"sex": "male"}], ("context", "length_mismatch")),
        ([], ("context", "length_mismatch")),
        ({"sex": "female"}, ("context", "wrong_type")),
    ],
)
def test_bad_context(
    guard: SchemaGuard, credit_record: dict[str, Any], context: Any, problem: tuple[str, str]
) -> None:
    error = _rejected(guard, _request([credit_record], context=context))

    assert _problems(error) == {problem}
    assert "other-zq" not in _client_text(error)


def test_bad_records_do_not_make_their_context_mismatch(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    broken = credit_record | {"purpose": "A499"}
    context = [{"sex": "female"}, {"sex": "male"}]

    error = _rejected(guard, _request([credit_record, broken], context=context))

    assert _problems(error) == {("records[1].purpose", "unknown_category")}
    for records in ({"duration_months": 12}, None):
        error = _rejected(guard, _request(records, context=context))
        assert {field for field, _ in _problems(error)} == {"records"}


@pytest.mark.parametrize("explain", ["yes", 1, None])
def test_explain_must_be_a_boolean(
    guard: SchemaGuard, credit_record: dict[str, Any], explain: Any
) -> None:
    error = _rejected(guard, _request([credit_record], explain=explain))

    assert _problems(error) == {("explain", "wrong_type")}


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        ({"duration_months": 12}, ("records", "wrong_type")),
        ("records", ("records", "wrong_type")),
        (None, ("records", "missing_field")),
        ([], ("records", "empty")),
        ([42], ("records[0]", "wrong_type")),
    ],
)
def test_records_must_be_a_non_empty_list_of_objects(
    guard: SchemaGuard, records: Any, problem: tuple[str, str]
) -> None:
    error = _rejected(guard, _request(records))

    assert _problems(error) == {problem}


def test_every_problem_of_a_batch_is_listed(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    records = [
        credit_record | {"duration_months": 0},
        dict(credit_record),
        credit_record | {"housing": "A999", "sex": "male"},
    ]

    error = _rejected(guard, _request(records, context=[{"sex": "x"}, None, None]))

    assert _problems(error) == {
        ("records[0].duration_months", "out_of_range"),
        ("records[2].housing", "unknown_category"),
        ("records[2].sex", "protected_attribute_in_features"),
        ("context[0].sex", "unknown_group"),
    }
    body = error.to_dict(request_id="req-1")
    assert body["code"] == "out_of_range"
    assert body["field"] == "records[0].duration_months"
    assert body["request_id"] == "req-1"
    assert {(e["field"], e["code"]) for e in body["errors"]} == _problems(error)


def test_a_hostile_batch_reports_a_bounded_number_of_problems(guard: SchemaGuard) -> None:
    records = [{"x": i, "y": i} for i in range(1_000)]

    error = _rejected(guard, _request(records))

    assert 0 < len(error.problems) <= 50


def test_a_huge_integer_is_out_of_range_not_a_crash(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    # json.loads turns a 400-digit literal into a Python int that float() cannot hold.
    value = json.loads("1" + "0" * 400)
    record = credit_record | {"duration_months": value, "credit_amount": -value}

    error = _rejected(guard, _request([record]))

    assert _problems(error) == {
        ("records[0].duration_months", "out_of_range"),
        ("records[0].credit_amount", "out_of_range"),
    }


def test_validate_record_returns_a_valid_record(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    clean = guard.validate_record(credit_record | {"duration_months": 24.0})

    assert clean == credit_record | {"duration_months": 24.0}
    assert list(clean) == guard.policy.feature_names


@pytest.mark.parametrize(("feature", "value", "code"), RECORD_CASES)
def test_validate_record_applies_the_same_rules_as_requests(
    guard: SchemaGuard, credit_record: dict[str, Any], feature: str, value: Any, code: str
) -> None:
    with pytest.raises(InvalidInputs) as caught:
        guard.validate_record(credit_record | {feature: value})

    assert _problems(caught.value) == {(f"records[0].{feature}", code)}


def test_validate_record_lists_every_problem_of_the_record(
    guard: SchemaGuard, credit_record: dict[str, Any]
) -> None:
    record = credit_record | {"housing": "A999", "sex": "male", "colour": "red"}
    del record["purpose"]

    with pytest.raises(InvalidInputs) as caught:
        guard.validate_record(record)

    assert _problems(caught.value) == {
        ("records[0].housing", "unknown_category"),
        ("records[0].purpose", "missing_field"),
        ("records[0].sex", "protected_attribute_in_features"),
        ("records[0].colour", "unexpected_field"),
    }
