"""Errors a client or an operator sees, each with a stable code and an HTTP status.

Clients get the code, a short reason, the offending field where there is one and the
request id; never feature values, guard scores, thresholds or wrapped exception text.
"""

from __future__ import annotations

from typing import Any


class GuardedServingError(Exception):
    """Base error: a stable machine-readable ``code`` and the HTTP status it maps to."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.field is not None:
            body["field"] = self.field
        if request_id is not None:
            body["request_id"] = request_id
        return body

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(GuardedServingError):
    """The request broke the policy's input schema; ``field`` names where."""

    status_code = 422
    code = "invalid_input"

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(f"{field}: {message}", code=rule, field=field)
        self.rule = rule

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        body = super().to_dict(request_id)
        body["errors"] = [{"field": self.field, "code": self.code, "error": self.message}]
        return body


class InvalidInputs(GuardedServingError):
    """Several schema violations found in one request, reported together."""

    status_code = 422
    code = "invalid_input"

    def __init__(self, problems: list[InvalidInput]) -> None:
        first = problems[0]
        super().__init__(first.message, code=first.code, field=first.field)
        self.problems = problems

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        body = super().to_dict(request_id)
        body["errors"] = [
            {"field": p.field, "code": p.code, "error": p.message} for p in self.problems
        ]
        return body


class MalformedBody(GuardedServingError):
    """The body is not JSON, or not a JSON object."""

    status_code = 400
    code = "malformed_body"


class Unauthenticated(GuardedServingError):
    """No API key, or one that is not known."""

    status_code = 401
    code = "unauthenticated"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="guarded-serving"'}


class RateLimited(GuardedServingError):
    """The client spent its budget for the current window."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("too many requests; retry later")
        self.retry_after_s = max(1, int(retry_after_s))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class GuardRejected(GuardedServingError):
    """A guard judged the request unsafe to serve under the model's policy."""

    status_code = 422

    def __init__(self, guard: str, code: str, field: str | None = None) -> None:
        super().__init__("request rejected", code=code, field=field)
        self.guard = guard


class UnknownModel(GuardedServingError):
    """The request named a model this server does not serve."""

    status_code = 404
    code = "unknown_model"


class ModelUnavailable(GuardedServingError):
    """The model is configured but failed to load, so it cannot answer."""

    status_code = 503
    code = "model_unavailable"


class ArtifactError(GuardedServingError):
    """An encrypted artifact could not be opened: wrong key, changed bytes, bad format."""

    code = "artifact_error"


class WrongMasterKey(ArtifactError):
    code = "wrong_master_key"


class ArtifactTampered(ArtifactError):
    code = "artifact_tampered"


class ConfigError(GuardedServingError):
    """A setting, a policy or a key file is invalid; raised at start-up."""

    code = "config_error"
