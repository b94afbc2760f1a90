"""Stage 2, admit: per-client, per-model row budgets with the ``limits`` library.

Each scored row costs one unit of the client's budget for the model, counted in a
moving window. The default storage is in memory (one worker); a ``redis://`` URI
shares the budget across replicas.

Known limitations: the in-memory store is per process, so N workers give a client N
budgets; a client holding several keys gets several budgets.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerSecond, storage, strategies

from guarded_serving.errors import InvalidInput, RateLimited
from guarded_serving.types import Outcome, ScoringRequest, Verdict


class AdmitStage:
    """Charge the request's rows to the client's budget, or refuse it.

    Args:
        storage_uri: A ``limits`` storage URI (``memory://``, ``redis://host:port``).

    Raises:
        RateLimited: The budget for the current window is spent (429, Retry-After).
        InvalidInput: The batch is larger than the policy allows in one request.
    """

    name = "admit"

    def __init__(self, storage_uri: str = "memory://") -> None:
        self._limiter = strategies.MovingWindowRateLimiter(
            storage.storage_from_string(storage_uri)
        )

    def __call__(self, request: ScoringRequest) -> None:
        limits = request.model.policy.limits
        rows = request.n_rows
        if rows > limits.max_batch_rows:
            request.verdicts.append(Verdict(self.name, Outcome.REJECT, "batch_too_large"))
            raise InvalidInput(
                "records",
                "batch_too_large",
                f"at most {limits.max_batch_rows} records per request",
            )
        budget = request.client_rows_per_window or limits.rows_per_window
        if rows > budget:
            # It could never be admitted; waiting would not help.
            request.verdicts.append(Verdict(self.name, Outcome.REJECT, "batch_too_large"))
            raise InvalidInput(
                "records", "batch_too_large", "more records than the client's budget per window"
            )
        item = RateLimitItemPerSecond(budget, limits.window_s)
        keys = (request.model.name, request.client_id or "")
        if self._limiter.hit(item, *keys, cost=max(rows, 1)):
            request.verdicts.append(Verdict(self.name, Outcome.PASS))
            return
        request.verdicts.append(Verdict(self.name, Outcome.REJECT, "rate_limited"))
        reset_at, _ = self._limiter.get_window_stats(item, *keys)
        raise RateLimited(retry_after_s=math.ceil(max(reset_at - time.time(), 1.0)))
