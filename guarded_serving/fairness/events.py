"""Fairness stage, request side: the events the record step hands to the accumulator.

A :class:`PredictionEvent` is built by the pipeline's last stage (record) for every
scored batch; a :class:`LabelEvent` arrives later, through the feedback endpoint, when
the true outcome of a record becomes known. Both are plain immutable values, cheap to
build on the request path; they are checked by the store, off the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PredictionEvent:
    """The outcomes a model gave to the records of one scored batch.

    Attributes:
        model: Name of the model, as in its policy.
        version: Version of the model that scored the batch.
        request_id: Id of the request, for correlation in logs.
        timestamp_s: Unix time of the prediction; it picks the time window.
        record_ids: One id per record, unique among every model sharing the store
            (a repeated id is ignored); labels sent later name the record by it.
        predicted: ``predicted[i]`` is 1 when record ``i`` received the favourable
            outcome (what fairness metrics call "selected"), else 0.
        groups: ``groups[i]`` maps a protected attribute name to the group of
            record ``i``. An attribute absent for a record leaves that record out of
            that attribute's counts.
    """

    model: str
    version: str
    request_id: str
    timestamp_s: float
    record_ids: tuple[str, ...]
    predicted: tuple[int, ...]
    groups: tuple[Mapping[str, str], ...]


@dataclass(frozen=True, slots=True)
class LabelEvent:
    """The true outcome of one earlier prediction.

    Attributes:
        record_id: The id the record had in its :class:`PredictionEvent`.
        label: 1 when the true outcome is the favourable one, else 0.
        model: The model the label is meant for; a record another model scored is
            then unknown. Any model's record when ``None``.
    """

    record_id: str
    label: int
    model: str | None = None


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """What became of a batch of labels.

    Attributes:
        accepted: Number of labels joined to their prediction and counted.
        unknown: Record ids with no stored prediction (never seen, or pruned).
        already_labelled: Record ids that had a label already; the new label was
            ignored.
    """

    accepted: int
    unknown: tuple[str, ...] = ()
    already_labelled: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """Returns the result as a JSON-ready mapping."""
        return {
            "accepted": self.accepted,
            "unknown": list(self.unknown),
            "already_labelled": list(self.already_labelled),
        }
