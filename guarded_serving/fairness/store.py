"""Fairness stage, persistence: per-group counts and predictions awaiting labels, in SQLite.

The accumulator's worker is the only writer; readers (reports, metric export) share
the same connection under a lock. Each batch of predictions and each batch of labels
is applied in one transaction, so the stored predictions and the counts built from
them always agree, even after a crash.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``; a committed
batch survives a crash or restart of the process, though the last few may be lost
if the whole machine loses power.

Known limitation: a prediction row is kept until :meth:`FairnessStore.prune_predictions`
removes it, so the file grows with traffic unless old rows are pruned; labels for
pruned records are reported as unknown.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from guarded_serving.errors import ConfigError
from guarded_serving.fairness.events import FeedbackResult, LabelEvent, PredictionEvent
from guarded_serving.fairness.metrics import GroupCounts

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    record_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    predicted INTEGER NOT NULL,
    groups TEXT NOT NULL,
    label INTEGER NULL
);
CREATE INDEX IF NOT EXISTS predictions_model_window ON predictions (model, window_start);
CREATE TABLE IF NOT EXISTS group_counts (
    model TEXT NOT NULL,
    attribute TEXT NOT NULL,
    grp TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    selected INTEGER NOT NULL DEFAULT 0,
    labelled INTEGER NOT NULL DEFAULT 0,
    label_pos INTEGER NOT NULL DEFAULT 0,
    true_pos INTEGER NOT NULL DEFAULT 0,
    false_pos INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, attribute, grp, window_start)
);
"""

_UPSERT_COUNTS = """
INSERT INTO group_counts
    (model, attribute, grp, window_start, n, selected, labelled, label_pos, true_pos, false_pos)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (model, attribute, grp, window_start) DO UPDATE SET
    n = n + excluded.n,
    selected = selected + excluded.selected,
    labelled = labelled + excluded.labelled,
    label_pos = label_pos + excluded.label_pos,
    true_pos = true_pos + excluded.true_pos,
    false_pos = false_pos + excluded.false_pos
"""

# Increments per (model, attribute, group, window_start):
# [n, selected, labelled, label_pos, true_pos, false_pos].
_Deltas = dict[tuple[str, str, str, int], list[int]]


class FairnessStore:
    """Per-group fairness counts and labelled-later predictions in one SQLite file.

    Args:
        path: Database file, created if missing, or ``":memory:"`` for a store that
            lives as long as the object.
        busy_timeout_s: How long a write waits for another process holding the
            file's write lock.

    Raises:
        ConfigError: If the file cannot be opened as a fairness store.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise ConfigError(
                f"fairness store {self.path}: cannot open ({exc.__class__.__name__})"
            ) from None
        try:
            self._initialise()
        except ConfigError:
            self._conn.close()
            raise
        except sqlite3.Error as exc:
            self._conn.close()
            raise ConfigError(
                f"fairness store {self.path}: not usable ({exc.__class__.__name__}: {exc})"
            ) from None
        # Reports read through their own connection: in WAL mode a reader never waits
        # for the writer, so a slow or blocked write cannot stall GET /fairness.
        self._reader, self._read_lock = self._conn, self._lock
        if self.path != ":memory:" and not self.path.startswith("file::memory:"):
            self._reader = sqlite3.connect(
                self.path, timeout=2.0, isolation_level=None, check_same_thread=False
            )
            self._read_lock = threading.Lock()

    def _initialise(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ConfigError(
                    f"fairness store {self.path}: schema version must be {SCHEMA_VERSION} "
                    f"(got {version})"
                )
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def apply_predictions(self, event: PredictionEvent, window_s: int) -> int:
        """Stores a batch of predictions and adds them to the counts, atomically.

        A record id already stored (from this batch or an earlier one) is ignored.

        Args:
            event: The batch.
            window_s: Width of the time windows, in seconds; the window is chosen by
                ``event.timestamp_s``.

        Returns:
            Number of records stored (duplicates excluded).

        Raises:
            ValueError: If lengths differ, an outcome is not 0 or 1 or the time is
                not finite; nothing is stored then.
            TypeError: If an id, name or group is not a string; nothing is stored
                then.
            sqlite3.Error: If the database fails; nothing is stored then.
        """
        _check_prediction(event)
        if window_s < 1:
            raise ValueError(f"window_s must be >= 1 (got {window_s})")
        window_start = int(event.timestamp_s // window_s) * window_s

        stored = 0
        deltas: _Deltas = {}
        with self._transaction() as conn:
            for record_id, predicted, groups in zip(
                event.record_ids, event.predicted, event.groups, strict=True
            ):
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO predictions "
                    "(record_id, model, version, window_start, predicted, groups) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record_id,
                        event.model,
                        event.version,
                        window_start,
                        int(predicted),
                        json.dumps(dict(groups), sort_keys=True),
                    ),
                )
                if cursor.rowcount == 0:
                    logger.debug(
                        "duplicate record id ignored",
                        extra={
                            "event": "fairness.duplicate_record",
                            "model": event.model,
                            "request_id": event.request_id,
                        },
                    )
                    continue
                stored += 1
                for attribute, group in groups.items():
                    d = deltas.setdefault((event.model, attribute, group, window_start), [0] * 6)
                    d[0] += 1
                    d[1] += int(predicted)
            _write_deltas(conn, deltas)
        return stored

    def apply_labels(self, labels: Iterable[LabelEvent]) -> FeedbackResult:
        """Joins true outcomes to their predictions and adds them to the counts, atomically.

        A label counts in the time window of its prediction, not of its arrival.

        Args:
            labels: The labels; a record labelled twice in the batch keeps the first.

        Returns:
            How many were accepted, and which record ids were unknown (or scored by
            another model than the label names) or already labelled; those change
            nothing.

        Raises:
            ValueError: If a label is not 0 or 1; nothing is stored then.
            TypeError: If a record id is not a string; nothing is stored then.
            sqlite3.Error: If the database fails; nothing is stored then.
        """
        labels = list(labels)
        for event in labels:
            _check_label(event)

        accepted = 0
        unknown: list[str] = []
        already: list[str] = []
        deltas: _Deltas = {}
        with self._transaction() as conn:
            for event in labels:
                row = conn.execute(
                    "SELECT model, window_start, predicted, groups, label "
                    "FROM predictions WHERE record_id = ?",
                    (event.record_id,),
                ).fetchone()
                if row is None or event.model not in (None, row[0]):
                    unknown.append(event.record_id)
                    continue
                model, window_start, predicted, groups_json, previous = row
                if previous is not None:
                    already.append(event.record_id)
                    continue

                conn.execute(
                    "UPDATE predictions SET label = ? WHERE record_id = ?",
                    (int(event.label), event.record_id),
                )
                accepted += 1
                label = int(event.label)
                for attribute, group in json.loads(groups_json).items():
                    d = deltas.setdefault((model, attribute, group, window_start), [0] * 6)
                    d[2] += 1
                    d[3] += label
                    d[4] += label & predicted
                    d[5] += (1 - label) & predicted
            _write_deltas(conn, deltas)
        return FeedbackResult(accepted, tuple(unknown), tuple(already))

    def counts(
        self, model: str | None = None, since_window_start: int | None = None
    ) -> list[GroupCounts]:
        """Counts per model, attribute and group, summed over time windows.

        Args:
            model: Only this model; all models when ``None``.
            since_window_start: Only windows starting at or after this Unix time.

        Returns:
            One entry per model, attribute and group, sorted by those.
        """
        clauses: list[str] = []
        params: list[str | int] = []
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        if since_window_start is not None:
            clauses.append("window_start >= ?")
            params.append(int(since_window_start))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            "SELECT model, attribute, grp, SUM(n), SUM(selected), SUM(labelled), "
            "SUM(label_pos), SUM(true_pos), SUM(false_pos) "
            f"FROM group_counts {where} GROUP BY model, attribute, grp "
            "ORDER BY model, attribute, grp"
        )
        with self._read_lock:
            rows = self._reader.execute(query, params).fetchall()
        return [GroupCounts(*row) for row in rows]

    def models(self) -> list[str]:
        """Names of the models with stored predictions or counts, sorted."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT model FROM group_counts UNION SELECT model FROM predictions ORDER BY 1"
            ).fetchall()
        return [row[0] for row in rows]

    def prune_predictions(self, before_window_start: int) -> int:
        """Deletes stored predictions of windows starting before a Unix time.

        Their counts stay; labels sent for them later are reported as unknown.

        Args:
            before_window_start: Windows starting before this time are pruned.

        Returns:
            Number of prediction rows deleted.
        """
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM predictions WHERE window_start < ?", (int(before_window_start),)
            )
        return cursor.rowcount

    def close(self) -> None:
        """Closes the database; later calls raise ``sqlite3.ProgrammingError``."""
        with self._lock:
            self._conn.close()
        if self._reader is not self._conn:
            with self._read_lock:
                self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _write_deltas(conn: sqlite3.Connection, deltas: _Deltas) -> None:
    conn.executemany(_UPSERT_COUNTS, [(*key, *values) for key, values in deltas.items()])


def _check_prediction(event: PredictionEvent) -> None:
    n = len(event.record_ids)
    if len(event.predicted) != n or len(event.groups) != n:
        raise ValueError(
            "record_ids, predicted and groups must have the same length "
            f"(got {n}, {len(event.predicted)}, {len(event.groups)})"
        )
    if not isinstance(event.model, str) or not isinstance(event.version, str):
        raise TypeError("model and version must be strings")
    if not math.isfinite(event.timestamp_s):
        raise ValueError("timestamp_s must be finite")
    for record_id, predicted, groups in zip(
        event.record_ids, event.predicted, event.groups, strict=True
    ):
        if not isinstance(record_id, str):
            raise TypeError("record ids must be strings")
        if predicted not in (0, 1):
            raise ValueError("predicted outcomes must be 0 or 1")
        if not isinstance(groups, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in groups.items()
        ):
            raise TypeError("groups must map attribute names to group names (strings)")


def _check_label(label: LabelEvent) -> None:
    if not isinstance(label.record_id, str):
        raise TypeError("record ids must be strings")
    if label.label not in (0, 1):
        raise ValueError("labels must be 0 or 1")
