"""Shared unit-test fixtures: the credit-risk policy, a valid record, one trained model.

The recipe trains and registers the credit-risk model once per session, in the
temporary BentoML store that the top-level conftest sets up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from guarded_serving import vault
from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk

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
class RecipeRun:
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
def sealing_key(tmp_path_factory: pytest.TempPathFactory) -> vault.FileKeyProvider:
    """The master key of the unit tests' models (apart from the integration tests' one)."""
    return vault.generate_key_file(tmp_path_factory.mktemp("unit-keys") / "master.key")


@pytest.fixture(scope="session")
def credit_run(sealing_key: vault.FileKeyProvider) -> RecipeRun:
    """The credit-risk recipe run once for the whole session."""
    echoed: list[str] = []
    tag = credit_risk.run(sealing_key, echo=echoed.append)
    return RecipeRun(tag=tag, provider=sealing_key, echoed=tuple(echoed))
