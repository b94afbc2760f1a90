"""Fairness stage, off the request path: a queue and one worker thread feeding the store.

The pipeline's record step calls :meth:`FairnessAccumulator.record`, which only puts
the event on a bounded queue: it never blocks and never raises; when the queue is
full the event is dropped, counted and (now and then) warned about. One daemon
thread applies queued events to the :class:`~guarded_serving.fairness.store.FairnessStore`
in order. Labels travel through the same queue, so a label sent after its
prediction was recorded always finds it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Self

from guarded_serving.errors import ConfigError, GuardedServingError
from guarded_serving.fairness.events import FeedbackResult, LabelEvent, PredictionEvent
from guarded_serving.fairness.metrics import FairnessReport, report_for_policies
from guarded_serving.fairness.store import FairnessStore, _check_label
from guarded_serving.policy import Policy

logger = logging.getLogger(__name__)

DROP_WARNING_INTERVAL_S = 60.0
"""Least time between two warnings about dropped events."""


class AccumulatorUnavailable(GuardedServingError, TimeoutError):
    """The accumulator could not apply labels in time: stopped, saturated or failing."""

    status_code = 503
    code = "fairness_unavailable"


@dataclass(slots=True)
class _Feedback:
    labels: tuple[LabelEvent, ...]
    future: Future[FeedbackResult]


@dataclass(slots=True)
class _Barrier:
    future: Future[None]


_STOP = object()


class FairnessAccumulator:
    """Applies prediction and label events to a store from a background thread.

    Args:
        store: Where counts are kept. The accumulator does not close it.
        window_s: Width of the time windows counts are kept in, in seconds.
        max_queue: Events that may wait for the worker before new ones are dropped.

    Raises:
        ConfigError: If ``window_s`` or ``max_queue`` is below 1.

    Attributes:
        dropped: Prediction events dropped because the queue was full.
        invalid: Prediction events dropped because they were malformed.
        failed: Events whose application failed in the store.
    """

    def __init__(self, store: FairnessStore, window_s: int = 3600, max_queue: int = 100_000):
        if window_s < 1:
            raise ConfigError(f"fairness window_s must be >= 1 (got {window_s})")
        if max_queue < 1:
            raise ConfigError(f"fairness max_queue must be >= 1 (got {max_queue})")
        self.store = store
        self.window_s = int(window_s)
        self.max_queue = int(max_queue)
        self.dropped = 0
        self.invalid = 0
        self.failed = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=self.max_queue)
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._drops_unreported = 0
        self._last_drop_warning = float("-inf")

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def queue_size(self) -> int:
        """Events waiting for the worker (approximate)."""
        return self._queue.qsize()

    def start(self) -> None:
        """Starts the worker thread; does nothing if it is running already.

        Events recorded before the start, or after a stop, are applied first.
        """
        with self._state_lock:
            if self.running:
                return
            self._thread = threading.Thread(
                target=self._run, name="guarded-serving-fairness", daemon=True
            )
            self._thread.start()
        logger.info("fairness accumulator started", extra={"event": "fairness.started"})

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Applies every event queued so far, then stops the worker.

        Args:
            timeout_s: How long to wait for the queue to drain.

        Returns:
            True if the worker stopped; False if it was still draining at the
            timeout (it then stops by itself once the queued events are applied).
        """
        deadline = time.monotonic() + timeout_s
        with self._state_lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                self._thread = None
                return True
            try:
                self._queue.put(_STOP, timeout=max(0.0, timeout_s))
            except queue.Full:
                logger.warning(
                    "fairness accumulator did not stop: queue still full",
                    extra={"event": "fairness.stop_timeout"},
                )
                return False
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning(
                    "fairness accumulator still draining at stop timeout",
                    extra={"event": "fairness.stop_timeout"},
                )
                return False
            self._thread = None
        logger.info("fairness accumulator stopped", extra={"event": "fairness.stopped"})
        return True

    def record(self, event: PredictionEvent) -> bool:
        """Queues a prediction event without waiting; safe on the request path.

        Args:
            event: The scored batch.

        Returns:
            True if queued; False if dropped (queue full, or not an event).
        """
        try:
            if not isinstance(event, PredictionEvent):
                self.invalid += 1
                return False
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self._note_drop()
            return False
        except Exception:  # noqa: BLE001 - the request path must never fail here
            # A broken event or queue must not fail the prediction that recorded it.
            self._note_drop()
            return False

    def feedback(self, labels: Iterable[LabelEvent], timeout_s: float = 5.0) -> FeedbackResult:
        """Applies true outcomes, after every prediction recorded before this call.

        Args:
            labels: The labels.
            timeout_s: How long to wait for the worker.

        Returns:
            How many labels were accepted, and which ids were unknown or already
            labelled.

        Raises:
            ValueError: If a label is not 0 or 1.
            TypeError: If a record id is not a string.
            AccumulatorUnavailable: If the worker is not running, the queue stayed
                full, the store failed, or the timeout passed. After a timeout the
                labels are applied only if the worker had already started on them;
                sending them again is safe, as a second label for a record changes
                nothing.
        """
        batch = tuple(labels)
        for label in batch:
            _check_label(label)
        if not self.running:
            raise AccumulatorUnavailable("fairness accumulator is not running")

        deadline = time.monotonic() + timeout_s
        future: Future[FeedbackResult] = Future()
        try:
            self._queue.put(_Feedback(batch, future), timeout=max(0.0, timeout_s))
        except queue.Full:
            raise AccumulatorUnavailable("fairness queue is full") from None

        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()
            raise AccumulatorUnavailable("fairness accumulator did not answer in time") from None
        except (ValueError, TypeError):
            raise
        except Exception:  # noqa: BLE001 - any store failure means the same to the caller
            raise AccumulatorUnavailable("fairness store failed") from None

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until every event queued before this call has been applied.

        Args:
            timeout_s: How long to wait.

        Returns:
            True when applied; False on timeout or when the worker is not running
            while events are waiting.
        """
        if not self.running:
            return self._queue.empty()
        deadline = time.monotonic() + timeout_s
        future: Future[None] = Future()
        try:
            self._queue.put(_Barrier(future), timeout=max(0.0, timeout_s))
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except (queue.Full, TimeoutError):
            future.cancel()
            return False
        return True

    def report(
        self,
        policies: Mapping[str, Policy] | None = None,
        model: str | None = None,
        since_timestamp_s: float | None = None,
        known_only: bool = False,
    ) -> FairnessReport:
        """Fairness figures from the store; queued events are not yet included.

        Call :meth:`flush` first to include everything recorded so far.

        Args:
            policies: Policy per model name, giving protected attributes and
                thresholds; models without one get default thresholds.
            model: Only this model; every model when ``None``.
            known_only: Only the models ``policies`` names (the store may hold
                counts of models this server no longer serves).
            since_timestamp_s: Only time windows that start at or after the window
                holding this Unix time; all windows when ``None``.

        Returns:
            The report; ``to_dict()`` gives its JSON form.
        """
        since_window_start = None
        if since_timestamp_s is not None:
            since_window_start = int(since_timestamp_s // self.window_s) * self.window_s
        counts = self.store.counts(model=model, since_window_start=since_window_start)
        policies = dict(policies or {})
        if known_only:
            counts = [c for c in counts if c.model in policies]

        if model is not None:
            policies = {model: policies[model]} if model in policies else {}
        return report_for_policies(counts, policies)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _note_drop(self) -> None:
        with self._drop_lock:
            self.dropped += 1
            self._drops_unreported += 1
            now = time.monotonic()
            if now - self._last_drop_warning < DROP_WARNING_INTERVAL_S:
                return
            count, self._drops_unreported = self._drops_unreported, 0
            self._last_drop_warning = now
        logger.warning(
            "fairness queue full: %d prediction event(s) dropped",
            count,
            extra={"event": "fairness.dropped", "dropped_total": self.dropped},
        )

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._apply(item)
            except Exception:
                self.failed += 1
                logger.exception(
                    "fairness worker failed on an event", extra={"event": "fairness.worker_error"}
                )

    def _apply(self, item: Any) -> None:
        if isinstance(item, PredictionEvent):
            try:
                self.store.apply_predictions(item, self.window_s)
            except (ValueError, TypeError) as exc:
                self.invalid += 1
                logger.warning(
                    "malformed prediction event dropped: %s",
                    exc,
                    extra={"event": "fairness.invalid", "request_id": item.request_id},
                )
            except Exception:
                self.failed += 1
                logger.exception(
                    "fairness store failed; prediction event dropped",
                    extra={"event": "fairness.store_error", "request_id": item.request_id},
                )
        elif isinstance(item, _Feedback):
            if not item.future.set_running_or_notify_cancel():
                return
            try:
                result = self.store.apply_labels(item.labels)
            except (ValueError, TypeError) as exc:
                item.future.set_exception(exc)
            except Exception as exc:
                self.failed += 1
                logger.exception(
                    "fairness store failed; labels not applied",
                    extra={"event": "fairness.store_error"},
                )
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)
        elif isinstance(item, _Barrier) and item.future.set_running_or_notify_cancel():
            item.future.set_result(None)
