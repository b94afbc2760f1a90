"""Recipe: the credit-risk reference model, xgboost on the Statlog German credit data.

Loads the vendored data, derives the protected attributes ``sex`` and ``age_band``
(monitoring context, never model inputs), trains on a seeded stratified 60/20/20
split with early stopping on validation, reports test figures and wraps the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split

from guarded_serving import vault
from guarded_serving.encoding import TabularEncoder
from guarded_serving.policy import Policy
from guarded_serving.wrap import wrap_model

logger = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "credit_risk"
DATA_FILE = MODEL_DIR / "data" / "german.data"
POLICY_FILE = MODEL_DIR / "policy.yaml"
SEED = 20240611

# Column order of german.data (UCI attribute 1..20, then the outcome).
RAW_COLUMNS = [
    "checking_status", "duration_months", "credit_history", "purpose", "credit_amount",
    "savings", "employment_since", "installment_rate", "personal_status_sex",
    "other_debtors", "residence_since", "property", "age_years", "other_installment_plans",
    "housing", "existing_credits", "job", "num_dependents", "telephone", "foreign_worker",
    "outcome",
]  # fmt: skip
FEMALE_CODES = {"A92", "A95"}
XGB_PARAMS = {
    "objective": "binary:logistic",
    "eval_metric": "auc",
    "eta": 0.05,
    "max_depth": 3,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 2,
    "lambda": 1.0,
    "nthread": 2,
    "seed": SEED,
}


@dataclass(frozen=True)
class Split:
    """Features, the target (1 = good risk) and the protected context of a split."""

    features: pd.DataFrame
    target: np.ndarray
    context: pd.DataFrame


def load_german_credit(path: Path = DATA_FILE) -> pd.DataFrame:
    """The data with named columns, ``good`` (1 = good risk), ``sex`` and ``age_band``."""
    frame = pd.read_csv(path, sep=r"\s+", header=None, names=RAW_COLUMNS)
    frame["good"] = (frame["outcome"] == 1).astype(int)
    frame["sex"] = np.where(frame["personal_status_sex"].isin(FEMALE_CODES), "female", "male")
    frame["age_band"] = np.where(frame["age_years"] < 25, "under_25", "25_and_over")
    return frame


def split(frame: pd.DataFrame, policy: Policy) -> tuple[Split, Split, Split]:
    """Seeded, stratified 60/20/20 train/validation/test split."""
    train, rest = train_test_split(frame, test_size=0.4, stratify=frame["good"], random_state=SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=rest["good"], random_state=SEED)
    attrs = [a.name for a in policy.protected_attributes]
    return tuple(  # type: ignore[return-value]
        Split(
            part[policy.feature_names].reset_index(drop=True),
            part["good"].to_numpy(),
            part[attrs].reset_index(drop=True),
        )
        for part in (train, val, test)
    )


def train(policy: Policy, train_split: Split, val_split: Split, rounds: int = 600) -> xgb.Booster:
    """Train with early stopping on validation AUC."""
    encoder = TabularEncoder(policy)
    dtrain = xgb.DMatrix(
        encoder.encode(train_split.features.to_dict("records")),
        label=train_split.target,
        feature_names=encoder.columns,
    )
    dval = xgb.DMatrix(
        encoder.encode(val_split.features.to_dict("records")),
        label=val_split.target,
        feature_names=encoder.columns,
    )
    return xgb.train(
        XGB_PARAMS,
        dtrain,
        num_boost_round=rounds,
        evals=[(dval, "validation")],
        early_stopping_rounds=50,
        verbose_eval=False,
    )


def run(provider: vault.KeyProvider, *, echo=print, name: str | None = None) -> str:
    """Train, evaluate on the test split, wrap and register. Returns the model tag.

    Args:
        provider: Master key provider for sealing.
        echo: Where the figures are printed.
        name: Register under this name instead of ``credit_risk``.
    """
    policy = Policy.from_file(POLICY_FILE).renamed(name)
    frame = load_german_credit()
    train_split, val_split, test_split = split(frame, policy)
    booster = train(policy, train_split, val_split)
    # Keep only the trees up to the best validation round.
    booster = booster[: booster.best_iteration + 1]

    encoder = TabularEncoder(policy)
    test_matrix = encoder.encode(test_split.features.to_dict("records"))
    probability = booster.predict(xgb.DMatrix(test_matrix, feature_names=encoder.columns))
    predicted = (probability >= policy.output.threshold).astype(int)
    figures = {
        "rows": {"train": len(train_split.target), "validation": len(val_split.target),
                 "test": len(test_split.target)},
        "test_roc_auc": round(float(roc_auc_score(test_split.target, probability)), 4),
        "test_accuracy": round(float(accuracy_score(test_split.target, predicted)), 4),
        "trees": booster.num_boosted_rounds(),
    }  # fmt: skip

    # Plain feature names in the saved model: the server feeds unnamed matrices.
    booster.feature_names = None
    result = wrap_model(
        policy=policy,
        runtime="xgboost",
        model_bytes=bytes(booster.save_raw(raw_format="ubj")),
        train=train_split.features,
        calibration=val_split.features,
        seed=SEED,
        provider=provider,
        figures=figures,
        holdout=test_split.features,
    )
    anomaly = result.manifest["calibration"]["anomaly"]
    echo(
        f"{policy.model}: {figures['rows']['train']} train / {figures['rows']['validation']} "
        f"validation / {figures['rows']['test']} test rows, {figures['trees']} trees"
    )
    echo(f"  test ROC AUC {figures['test_roc_auc']:.4f}, accuracy {figures['test_accuracy']:.4f}")
    echo(
        f"  anomaly guard: threshold {anomaly['threshold']:.3f} calibrated on "
        f"{anomaly['calibration_rows']} validation rows for a {anomaly['target_fpr']:.0%} "
        f"false-positive rate; flags {anomaly['holdout_flag_rate']:.1%} of test rows"
    )
    echo(f"  registered {result.tag} (sealed with master key {result.manifest['key_id']})")
    return result.tag
