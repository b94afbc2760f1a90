"""Shared unit-test fixtures: the credit-risk policy, a valid record, one trained model.

The recipe trains and registers the credit-risk model once per session, in a BentoML
store under a temporary ``BENTOML_HOME`` (the top-level conftest sets it; this file
sets one only if it is missing, before anything imports bentoml).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if not os.environ.get("BENTOML_HOME"):
    _home = tempfile.mkdtemp(prefix="gs-unit-bentoml-")
    os.environ["BENTOML_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from guarded_serving import vault  # noqa: E402
from guarded_serving.policy import Policy  # noqa: E402
from guarded_serving.recipes import credit_risk  # noqa: E402

CREDIT_RECORD: dict[str, Any] = {
    "checking_status": "A11",
    "duration_months": 12,
    "credit_history": "A32",
    "purpose": "A43",
    "credit_amount": 2500,
    "savings": "A61",
    "employment_since": "A73",
    "installment_rate": 2,
    "other_debtors": "A101",
    "residence_since": 2,
    "property": "A121",
    "other_installment_plans": "A143",
    "housing": "A152",
    "existing_credits": 1,
    "job": "A173",
    "num_dependents": 1,
    "telephone": "A191",
    "foreign_worker": "A201",
}


@dataclass(frozen=True)
class TrainedModel:
    """A model the recipe registered, the key it is sealed under, and what it printed."""

    tag: str
    provider: vault.FileKeyProvider
    echoed: tuple[str, ...]


@pytest.fixture(scope="session")
def credit_policy() -> Policy:
    return Policy.from_file(credit_risk.POLICY_FILE)


@pytest.fixture
def credit_record() -> dict[str, Any]:
    """A valid credit-risk record; each test gets its own copy to change."""
    return dict(CREDIT_RECORD)


@pytest.fixture(scope="session")
def master_key(tmp_path_factory: pytest.TempPathFactory) -> vault.FileKeyProvider:
    return vault.generate_key_file(tmp_path_factory.mktemp("keys") / "master.key")


@pytest.fixture(scope="session")
def credit_model(master_key: vault.FileKeyProvider) -> TrainedModel:
    """The credit-risk recipe run once for the whole session."""
    echoed: list[str] = []
    tag = credit_risk.run(master_key, echo=echoed.append)
    return TrainedModel(tag=tag, provider=master_key, echoed=tuple(echoed))
