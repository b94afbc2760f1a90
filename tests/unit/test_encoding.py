"""Feature encoding: column layout from the policy, one-hot categories, folding back."""

from __future__ import annotations

import numpy as np
import pytest

from guarded_serving.encoding import TabularEncoder
from guarded_serving.policy import Policy

SMALL = Policy.model_validate(
    {
        "model": "small",
        "features": [
            {"name": "age", "type": "integer", "min": 0, "max": 120},
            {"name": "colour", "type": "category", "categories": ["red", "green", "blue"]},
            {"name": "income", "type": "float", "min": 0, "max": 1e6},
            {"name": "owner", "type": "category", "categories": ["no", "yes"]},
        ],
        "output": {"positive_label": "yes", "negative_label": "no"},
    }
)


def test_column_layout_follows_the_policy() -> None:
    encoder = TabularEncoder(SMALL)

    assert encoder.columns == [
        "age",
        "colour=red",
        "colour=green",
        "colour=blue",
        "income",
        "owner=no",
        "owner=yes",
    ]
    assert encoder.n_columns == 7
    assert encoder.numeric_mask == [True, False, False, False, True, False, False]
    assert encoder.feature_columns == {
        "age": slice(0, 1),
        "colour": slice(1, 4),
        "income": slice(4, 5),
        "owner": slice(5, 7),
    }


def test_encode_passes_numbers_and_one_hot_encodes_categories() -> None:
    encoder = TabularEncoder(SMALL)
    records = [
        {"age": 30, "colour": "green", "income": 1234.5, "owner": "yes"},
        {"age": 71.0, "colour": "blue", "income": 0, "owner": "no"},
    ]

    matrix = encoder.encode(records)

    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(
        matrix,
        np.array(
            [
                [30, 0, 1, 0, 1234.5, 0, 1],
                [71, 0, 0, 1, 0, 1, 0],
            ],
            dtype=np.float32,
        ),
    )


def test_every_category_gets_its_own_column() -> None:
    records = [
        {"age": 1, "colour": c, "income": 1.0, "owner": "no"} for c in ("red", "green", "blue")
    ]

    matrix = TabularEncoder(SMALL).encode(records)

    np.testing.assert_array_equal(matrix[:, 1:4], np.eye(3, dtype=np.float32))


def test_credit_policy_layout(credit_policy: Policy) -> None:
    encoder = TabularEncoder(credit_policy)

    # 6 numeric features and 12 categorical ones with 51 codes between them.
    assert encoder.n_columns == 57
    assert sum(encoder.numeric_mask) == 6
    assert list(encoder.feature_columns) == credit_policy.feature_names
    assert encoder.columns[:5] == [
        "checking_status=A11",
        "checking_status=A12",
        "checking_status=A13",
        "checking_status=A14",
        "duration_months",
    ]


def test_extra_keys_are_ignored_and_missing_ones_raise() -> None:
    encoder = TabularEncoder(SMALL)
    record = {"age": 3, "colour": "red", "income": 2.0, "owner": "no"}

    np.testing.assert_array_equal(
        encoder.encode([record | {"unused": "x"}]), encoder.encode([record])
    )
    with pytest.raises(KeyError):
        encoder.encode([{"age": 3, "colour": "red", "income": 2.0}])


def test_empty_batch_gives_an_empty_matrix() -> None:
    assert TabularEncoder(SMALL).encode([]).shape == (0, 7)


def test_fold_sums_each_features_columns_in_policy_order() -> None:
    encoder = TabularEncoder(SMALL)
    values = np.arange(14, dtype=np.float32).reshape(2, 7)

    folded = encoder.fold(values)

    assert folded.dtype == np.float64
    np.testing.assert_array_equal(
        folded,
        np.array([[0, 1 + 2 + 3, 4, 5 + 6], [7, 8 + 9 + 10, 11, 12 + 13]], dtype=np.float64),
    )


def test_fold_keeps_row_totals() -> None:
    encoder = TabularEncoder(SMALL)
    values = np.random.default_rng(7).normal(size=(5, 7))

    np.testing.assert_allclose(encoder.fold(values).sum(axis=1), values.sum(axis=1))
