"""Fairness stage, telemetry: the store's counts and figures as OpenTelemetry metrics.

Per group (attributes ``model``, ``attribute``, ``group``) the exporter reports
cumulative counters, which a metrics backend can sum across replicas before taking
rates, and the selection rate as a gauge; per model and attribute it reports the
disparities as gauges. Figures cover every time window in the store.

Values are read from the store once per collection (cached for ``cache_s``), never
on the request path. A failing read is counted and logged; it never raises into
the metrics SDK.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from guarded_serving.fairness.accumulator import FairnessAccumulator
from guarded_serving.fairness.metrics import FairnessReport, GroupCounts, report_for_policies
from guarded_serving.fairness.store import FairnessStore
from guarded_serving.policy import Policy

logger = logging.getLogger(__name__)

PREFIX = "guarded_serving.fairness"

# (name suffix, GroupCounts field, unit, description)
_COUNTERS = (
    ("predictions", "n", "{prediction}", "Predictions recorded, per protected group."),
    (
        "selected",
        "selected",
        "{prediction}",
        "Predictions with the favourable outcome, per protected group.",
    ),
    (
        "labelled",
        "labelled",
        "{prediction}",
        "Predictions whose true outcome is known, per protected group.",
    ),
    (
        "label_positives",
        "label_pos",
        "{prediction}",
        "Labelled predictions whose true outcome is favourable, per protected group.",
    ),
    (
        "true_positives",
        "true_pos",
        "{prediction}",
        "Labelled predictions favourable both predicted and true, per protected group.",
    ),
    (
        "false_positives",
        "false_pos",
        "{prediction}",
        "Labelled predictions favourable predicted but not true, per protected group.",
    ),
)

# (name suffix, AttributeReport field, description)
_DISPARITIES = (
    (
        "disparate_impact_ratio",
        "disparate_impact_ratio",
        "Lowest over highest selection rate among eligible groups.",
    ),
    (
        "demographic_parity_difference",
        "demographic_parity_difference",
        "Highest minus lowest selection rate among eligible groups.",
    ),
    (
        "equal_opportunity_difference",
        "equal_opportunity_difference",
        "Highest minus lowest true positive rate among eligible groups.",
    ),
)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    counts: list[GroupCounts]
    report: FairnessReport


class FairnessExporter:
    """Registers observable fairness instruments on a meter.

    Args:
        source: The accumulator (its dropped events and queue depth are exported
            too) or the store to read.
        policies: Policy per model name, for protected attributes and thresholds.
        meter: The meter to register on, normally ``get_meter("guarded_serving")``.
        cache_s: How long one read of the store serves the instruments' callbacks.

    Attributes:
        collection_errors: Collections that failed to read the store.
    """

    def __init__(
        self,
        source: FairnessAccumulator | FairnessStore,
        policies: Mapping[str, Policy],
        meter: Meter,
        cache_s: float = 1.0,
    ) -> None:
        if isinstance(source, FairnessAccumulator):
            self._accumulator: FairnessAccumulator | None = source
            self._store = source.store
        else:
            self._accumulator = None
            self._store = source
        self._policies = dict(policies)
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: _Snapshot | None = None
        self._cached_at = float("-inf")
        self.collection_errors = 0

        for suffix, field, unit, description in _COUNTERS:
            meter.create_observable_counter(
                f"{PREFIX}.{suffix}",
                callbacks=[self._callback(self._group_counter(field))],
                unit=unit,
                description=description,
            )
        meter.create_observable_gauge(
            f"{PREFIX}.selection_rate",
            callbacks=[self._callback(self._selection_rates)],
            unit="1",
            description="Share of a protected group's predictions with the favourable outcome.",
        )
        for suffix, field, description in _DISPARITIES:
            meter.create_observable_gauge(
                f"{PREFIX}.{suffix}",
                callbacks=[self._callback(self._disparity(field))],
                unit="1",
                description=description,
            )
        if self._accumulator is not None:
            meter.create_observable_counter(
                f"{PREFIX}.dropped_events",
                callbacks=[self._accumulator_value(lambda a: a.dropped)],
                unit="{event}",
                description="Prediction events dropped because the fairness queue was full.",
            )
            meter.create_observable_gauge(
                f"{PREFIX}.queue_depth",
                callbacks=[self._accumulator_value(lambda a: a.queue_size)],
                unit="{event}",
                description="Events waiting for the fairness worker.",
            )

    def snapshot(self) -> FairnessReport | None:
        """The report the instruments export now; ``None`` if the store failed."""
        snap = self._snapshot()
        return None if snap is None else snap.report

    def _snapshot(self) -> _Snapshot | None:
        with self._lock:
            now = time.monotonic()
            if now - self._cached_at < self._cache_s:
                return self._cached
            self._cached_at = now
            try:
                counts = self._store.counts()
                self._cached = _Snapshot(counts, report_for_policies(counts, self._policies))
            except Exception:
                self._cached = None
                self.collection_errors += 1
                logger.warning(
                    "fairness metrics not collected: store read failed",
                    exc_info=True,
                    extra={"event": "fairness.export_error"},
                )
            return self._cached

    def _callback(
        self, observe: Callable[[_Snapshot], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            try:
                snap = self._snapshot()
                return [] if snap is None else list(observe(snap))
            except Exception:
                with self._lock:
                    self.collection_errors += 1
                logger.warning(
                    "fairness metric callback failed",
                    exc_info=True,
                    extra={"event": "fairness.export_error"},
                )
                return []

        return callback

    def _accumulator_value(
        self, read: Callable[[FairnessAccumulator], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        accumulator = self._accumulator

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [] if accumulator is None else [Observation(read(accumulator))]
            except Exception:
                logger.warning("fairness metric callback failed", exc_info=True)
                return []

        return callback

    @staticmethod
    def _group_counter(field: str) -> Callable[[_Snapshot], Iterable[Observation]]:
        def observe(snap: _Snapshot) -> Iterable[Observation]:
            for c in snap.counts:
                yield Observation(
                    getattr(c, field),
                    {"model": c.model, "attribute": c.attribute, "group": c.group},
                )

        return observe

    @staticmethod
    def _selection_rates(snap: _Snapshot) -> Iterable[Observation]:
        for model, model_report in snap.report.models.items():
            for attribute, attribute_report in model_report.attributes.items():
                for group, g in attribute_report.groups.items():
                    if g.selection_rate is not None:
                        yield Observation(
                            g.selection_rate,
                            {"model": model, "attribute": attribute, "group": group},
                        )

    @staticmethod
    def _disparity(field: str) -> Callable[[_Snapshot], Iterable[Observation]]:
        def observe(snap: _Snapshot) -> Iterable[Observation]:
            for model, model_report in snap.report.models.items():
                for attribute, attribute_report in model_report.attributes.items():
                    value = getattr(attribute_report, field)
                    if value is not None:
                        yield Observation(value, {"model": model, "attribute": attribute})

        return observe
