"""Fairness stage: streaming per-group counts, labels joined later, metrics and export.

The request path only calls :meth:`FairnessAccumulator.record`; a worker thread keeps
counts per model, protected attribute, group and time window in a
:class:`FairnessStore`, reports come from :func:`compute_report`, and
:class:`FairnessExporter` publishes them through OpenTelemetry.
"""

from guarded_serving.fairness.accumulator import AccumulatorUnavailable, FairnessAccumulator
from guarded_serving.fairness.events import FeedbackResult, LabelEvent, PredictionEvent
from guarded_serving.fairness.export import FairnessExporter
from guarded_serving.fairness.metrics import (
    Alert,
    AttributeReport,
    FairnessReport,
    GroupCounts,
    GroupReport,
    ModelReport,
    compute_report,
    report_for_policies,
    wilson_interval,
)
from guarded_serving.fairness.store import FairnessStore

__all__ = [
    "AccumulatorUnavailable",
    "Alert",
    "AttributeReport",
    "FairnessAccumulator",
    "FairnessExporter",
    "FairnessReport",
    "FairnessStore",
    "FeedbackResult",
    "GroupCounts",
    "GroupReport",
    "LabelEvent",
    "ModelReport",
    "PredictionEvent",
    "compute_report",
    "report_for_policies",
    "wilson_interval",
]
