"""Rebuild adult_sample.csv from the UCI Adult files (run from this folder).

    python make_sample.py /path/to/adult.data /path/to/adult.test

Drops rows with missing values ('?'), strips the test file's junk first line and the
trailing '.' of its labels, and draws a seeded sample of 3000 training and 1000 test
rows, keeping the columns the tests use.
"""

import sys

import pandas as pd

COLUMNS = [
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education_num",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
    "native_country",
    "income",
]
KEEP = [
    "age",
    "workclass",
    "education_num",
    "marital_status",
    "occupation",
    "relationship",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
    "sex",
    "race",
    "income",
    "split",
]


def load(path: str, skiprows: int) -> pd.DataFrame:
    frame = pd.read_csv(
        path, names=COLUMNS, skipinitialspace=True, na_values="?", skiprows=skiprows
    ).dropna()
    frame["income"] = frame["income"].str.rstrip(".").map({">50K": 1, "<=50K": 0})
    return frame


def main(train_path: str, test_path: str) -> None:
    train = load(train_path, 0).sample(3000, random_state=20240611).assign(split="train")
    test = load(test_path, 1).sample(1000, random_state=20240611).assign(split="test")
    pd.concat([train, test])[KEEP].to_csv("adult_sample.csv", index=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
