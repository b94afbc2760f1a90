"""Stage 3, validate: every row and its context against the policy's input schema.

Problems are collected for the whole batch and returned together, each naming its
field (``records[2].duration_months``) and rule, never echoing the offending value.

Known limitations: values are checked one by one against declared types and ranges;
combinations of individually valid values are the anomaly stage's job.
"""

from __future__ import annotations

import math
import re
from typing import Any

from guarded_serving.encoding import TabularEncoder, TensorEncoder, encoder_for
from guarded_serving.errors import InvalidInput, InvalidInputs
from guarded_serving.guards.tensor import TensorCheck
from guarded_serving.policy import CategoricalFeature, NumericFeature, Policy
from guarded_serving.runtimes.base import ModelInput
from guarded_serving.types import Outcome, ScoringRequest, Verdict

# Stop collecting after this many problems; a hostile batch must not cost much.
_MAX_PROBLEMS = 50
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class SchemaGuard:
    """Validate and normalize raw records and their protected-attribute context."""

    name = "validate"

    def __init__(
        self, policy: Policy, encoder: TabularEncoder | TensorEncoder | None = None
    ) -> None:
        self.policy = policy
        self.encoder = encoder or encoder_for(policy)
        self._tensor = TensorCheck(policy.input) if policy.input is not None else None
        self._features = {f.name: f for f in policy.features}
        self._groups = {a.name: set(a.groups) for a in policy.protected_attributes}

    def __call__(self, request: ScoringRequest) -> None:
        """Fill ``request.records``, ``request.context``, ``request.explain`` and the
        model's ``request.inputs``.

        Raises:
            InvalidInputs: One or more schema violations, all of them listed.
        """
        problems: list[InvalidInput] = []
        records = self._records(request.raw_records, problems)
        # Count the records sent, not the valid ones: context pairs with what was sent.
        sent = request.raw_records
        context = self._context(
            request.raw_context, len(sent) if isinstance(sent, list) else None, problems
        )
        if not isinstance(request.raw_explain, bool):
            problems.append(InvalidInput("explain", "wrong_type", "expected a boolean"))
        if problems:
            request.verdicts.append(Verdict(self.name, Outcome.REJECT, problems[0].code))
            raise InvalidInputs(problems[:_MAX_PROBLEMS])
        request.records = records
        request.context = context
        request.explain = bool(request.raw_explain)
        request.inputs = ModelInput(records, self.encoder)
        request.verdicts.append(Verdict(self.name, Outcome.PASS))

    def validate_record(self, record: Any) -> Any:
        """Check one record on its own (used on training data when a model is wrapped).

        Raises:
            InvalidInputs: The record breaks the schema.
        """
        problems: list[InvalidInput] = []
        clean = self._one("records[0]", record, problems)
        if problems:
            raise InvalidInputs(problems)
        return clean

    def _records(self, raw: Any, problems: list[InvalidInput]) -> list[dict[str, Any]]:
        if raw is None:
            problems.append(InvalidInput("records", "missing_field", "required"))
            return []
        if not isinstance(raw, list):
            problems.append(InvalidInput("records", "wrong_type", "expected a list of objects"))
            return []
        if not raw:
            problems.append(InvalidInput("records", "empty", "expected at least one record"))
            return []
        out = []
        for i, record in enumerate(raw):
            clean = self._one(f"records[{i}]", record, problems)
            if clean is not None:
                out.append(clean)
            if len(problems) >= _MAX_PROBLEMS:
                break
        return out

    def _one(self, where: str, record: Any, problems: list[InvalidInput]) -> Any:
        if self._tensor is not None:
            array, problem = self._tensor.check(where, record)
            if problem is not None:
                problems.append(problem)
            return array
        if not isinstance(record, dict):
            problems.append(InvalidInput(where, "wrong_type", "expected an object"))
            return None
        return self._record(where, record, problems)

    def _record(
        self, where: str, record: dict[str, Any], problems: list[InvalidInput]
    ) -> dict[str, Any]:
        clean: dict[str, Any] = {}
        for name, feature in self._features.items():
            field = f"{where}.{name}"
            if name not in record or record[name] is None:
                problems.append(InvalidInput(field, "missing_field", "required feature"))
                continue
            problem = _check(feature, record[name], field)
            if problem is not None:
                problems.append(problem)
            else:
                clean[name] = record[name]
        for name in record:
            if len(problems) >= _MAX_PROBLEMS:
                break
            if name in self._features:
                continue
            if name in self._groups:
                problems.append(
                    InvalidInput(
                        f"{where}.{name}",
                        "protected_attribute_in_features",
                        "protected attributes go in 'context', not in the record",
                    )
                )
            else:
                problems.append(_unexpected(where, name, "not a feature"))
        return clean

    def _context(
        self, raw: Any, n_rows: int | None, problems: list[InvalidInput]
    ) -> list[dict[str, str]]:
        """The context per record; ``n_rows`` is None when no list of records came."""
        if raw is None:
            return [{} for _ in range(n_rows or 0)]
        if not isinstance(raw, list):
            problems.append(InvalidInput("context", "wrong_type", "expected a list of objects"))
            return []
        if n_rows is None:
            return []
        if len(raw) != n_rows:
            problems.append(
                InvalidInput("context", "length_mismatch", "expected one entry per record")
            )
            return []
        out = []
        for i, entry in enumerate(raw):
            where = f"context[{i}]"
            if entry is None:
                out.append({})
                continue
            if not isinstance(entry, dict):
                problems.append(InvalidInput(where, "wrong_type", "expected an object"))
                continue
            clean = {}
            for name, group in entry.items():
                if len(problems) >= _MAX_PROBLEMS:
                    break
                field = f"{where}.{name}"
                allowed = self._groups.get(name)
                if allowed is None:
                    problems.append(_unexpected(where, name, "not a protected attribute"))
                elif group is None:
                    continue
                elif not isinstance(group, str):
                    problems.append(InvalidInput(field, "wrong_type", "expected a string"))
                elif group not in allowed:
                    problems.append(
                        InvalidInput(field, "unknown_group", "not one of the policy's groups")
                    )
                else:
                    clean[name] = group
            out.append(clean)
        return out


def _unexpected(where: str, name: str, why: str) -> InvalidInput:
    """An unknown field, named only when its name is a plain identifier.

    Names a client made up are echoed back only when short and plain, so that an
    error cannot carry arbitrary text (or many megabytes of it) back to the caller.
    """
    if _PLAIN_NAME.fullmatch(name):
        return InvalidInput(f"{where}.{name}", "unexpected_field", why)
    return InvalidInput(where, "unexpected_field", f"a field name that is {why}")


def _check(
    feature: NumericFeature | CategoricalFeature, value: Any, field: str
) -> InvalidInput | None:
    if isinstance(feature, CategoricalFeature):
        if not isinstance(value, str):
            return InvalidInput(field, "wrong_type", "expected a string category code")
        if value not in feature.categories:
            return InvalidInput(field, "unknown_category", "not one of the policy's categories")
        return None
    # bool is an int in Python but never a number on the wire.
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = "an integer" if feature.type == "integer" else "a number"
        return InvalidInput(field, "wrong_type", f"expected {expected}")
    # Only floats can be NaN or infinite; ints are compared exactly, however large.
    if isinstance(value, float) and not math.isfinite(value):
        return InvalidInput(field, "not_finite", "NaN and infinity are not allowed")
    if feature.type == "integer" and isinstance(value, float) and not value.is_integer():
        return InvalidInput(field, "not_integer", "expected an integer")
    if not feature.min <= value <= feature.max:
        return InvalidInput(
            field, "out_of_range", f"outside the allowed range [{feature.min:g}, {feature.max:g}]"
        )
    return None
