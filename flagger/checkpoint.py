"""The flagger's checkpoint: a SQLite file that per-image results are appended to.

It is what makes a run resumable and its memory flat. Results are committed one batch
at a time, each batch together with the units it finishes, so a run killed at any
moment leaves whole units done and nothing half-written. Rows are keyed by
(model, image key): re-running with the same model skips what is done; another model
starts its own rows beside them. Study aggregation and the output files are streamed
from here (sorted by study through an index), never from lists in memory.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

from flagger.records import HINT_FIELDS, ImageRecord, UnitKind, UnitResult

SCHEMA_VERSION = "1"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    run_model TEXT NOT NULL,       -- '<version>/<onnx file>': fp32 and INT8 results never mix
    key TEXT NOT NULL,             -- '<sop_instance_uid>:<frame>'
    unit TEXT NOT NULL,
    {", ".join(f"{name} TEXT NOT NULL DEFAULT ''" for name in HINT_FIELDS)},
    probs TEXT NOT NULL,           -- JSON list of calibrated probabilities, model spec class order
    novelty REAL,                  -- mammoflag.novelty (NULL: the version has no novelty reference)
    PRIMARY KEY (run_model, key)
);
CREATE INDEX IF NOT EXISTS images_by_study ON images (run_model, study_instance_uid, key);
CREATE TABLE IF NOT EXISTS units (
    run_model TEXT NOT NULL, unit TEXT NOT NULL, images INTEGER NOT NULL,
    PRIMARY KEY (run_model, unit)
);
CREATE TABLE IF NOT EXISTS errors (
    run_model TEXT NOT NULL, unit TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
    path TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (run_model, unit, key)
);
CREATE TABLE IF NOT EXISTS human_labels (
    key TEXT PRIMARY KEY,
    labels TEXT NOT NULL           -- JSON list of 0/1, model spec class order
);
"""


class CheckpointMismatch(RuntimeError):
    """The checkpoint belongs to another input or another class list."""


class CheckpointBusy(RuntimeError):
    """Another run is writing to the same checkpoint."""


class CheckpointUnwritable(RuntimeError):
    """The checkpoint cannot be created or written (a full disk, a read-only folder)."""


class Checkpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One run per checkpoint: two would interleave their job folders and outputs.
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CheckpointBusy(f"another flagging run is using {self.path.name}") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=60)
            # WAL + NORMAL: a commit survives a killed process (not necessarily a power cut,
            # which at worst loses the last batches; they are recomputed on resume).
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            # a checkpoint from before novelty (same schema otherwise): its rows read back with none
            if "novelty" not in {r[1] for r in self.db.execute("PRAGMA table_info(images)")}:
                self.db.execute("ALTER TABLE images ADD COLUMN novelty REAL")
        except sqlite3.Error as exc:
            self._lock.close()
            raise CheckpointUnwritable(f"cannot write the checkpoint {self.path.name} ({exc}); free some disk space "
                                       "or choose another --checkpoint") from None

    def close(self) -> None:
        self.db.close()
        self._lock.close()  # releases the lock

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- identity -------------------------------------------------------------------------
    def bind(self, input_id: str, classes: tuple[str, ...]) -> None:
        """Tie the checkpoint to one input and class list; refuse to mix in another."""
        expected = {"schema": SCHEMA_VERSION, "input": input_id, "classes": json.dumps(list(classes))}
        found = dict(self.db.execute("SELECT name, value FROM meta").fetchall())
        for name, value in expected.items():
            if name in found and found[name] != value:
                raise CheckpointMismatch(
                    f"checkpoint {self.path.name} was made for another {name} ({found[name]!r}); "
                    f"use another --checkpoint or remove it")
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", expected.items())

    # --- resume ---------------------------------------------------------------------------
    def done_units(self, model: str, unit_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(unit_ids), 500):
            chunk = unit_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(
                f"SELECT unit FROM units WHERE run_model = ? AND unit IN ({marks})", [model, *chunk]))
        return found

    def count_done(self, model: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM units WHERE run_model = ?", (model,)).fetchone()[0]

    def forget_failures(self, model: str) -> None:
        """Failed units are tried again on every run; problems of finished units (duplicates) stay."""
        with self.db:
            self.db.execute("DELETE FROM errors WHERE run_model = ? AND unit NOT IN "
                            "(SELECT unit FROM units WHERE run_model = ?)", (model, model))

    # --- results --------------------------------------------------------------------------
    def add_results(self, model: str, results: Iterable[UnitResult]) -> tuple[int, int]:
        """Store finished units in one transaction; returns (images stored, problems recorded).

        A unit already done (a shard delivered twice) is ignored, so merging is idempotent.
        An image key already stored from another unit is recorded as a duplicate, not stored twice.
        """
        stored = problems = 0
        columns = ", ".join(HINT_FIELDS)
        marks = ", ".join("?" * len(HINT_FIELDS))
        with self.db:
            for result in results:
                unit = result.unit
                if self.db.execute("SELECT 1 FROM units WHERE run_model = ? AND unit = ?",
                                   (model, unit.unit_id)).fetchone():
                    continue
                if result.problem:
                    self._add_problem(model, result, result.problem.status, result.problem.reason, result.problem.key)
                    problems += 1
                    continue
                for image in result.images:
                    cur = self.db.execute(
                        f"INSERT OR IGNORE INTO images (run_model, key, unit, {columns}, probs, novelty) "
                        f"VALUES (?, ?, ?, {marks}, ?, ?)",
                        (model, image.key, unit.unit_id, *(image.hints.get(n, "") for n in HINT_FIELDS),
                         json.dumps(list(image.probs)), image.novelty))
                    if cur.rowcount:
                        stored += 1
                    else:
                        self._add_problem(model, result, "duplicate",
                                          "same SOP Instance UID and frame as another input file; kept the first",
                                          image.key)
                        problems += 1
                self.db.execute("INSERT INTO units (run_model, unit, images) VALUES (?, ?, ?)",
                                (model, unit.unit_id, len(result.images)))
        return stored, problems

    def _add_problem(self, model: str, result: UnitResult, status: str, reason: str, key: str) -> None:
        unit = result.unit
        path = (unit.manifest_row or {}).get("image", "") if unit.kind is UnitKind.DISPLAY else unit.unit_id
        self.db.execute("INSERT OR REPLACE INTO errors (run_model, unit, key, kind, path, status, reason) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (model, unit.unit_id, key, unit.kind, path, status, reason))

    # --- human labels ---------------------------------------------------------------------
    def replace_human_labels(self, labels: Iterable[tuple[str, tuple[int, ...]]]) -> int:
        with self.db:
            self.db.execute("DELETE FROM human_labels")
            cur = self.db.executemany("INSERT OR REPLACE INTO human_labels (key, labels) VALUES (?, ?)",
                                      ((k, json.dumps(list(v))) for k, v in labels))
        return max(cur.rowcount, 0)

    # --- reading back ---------------------------------------------------------------------
    def iter_images(self, model: str) -> Iterator[tuple[ImageRecord, tuple[int, ...] | None]]:
        """Every stored image of a model with its human labels (or None), sorted by study then key."""
        columns = ", ".join(f"i.{n}" for n in HINT_FIELDS)
        cur = self.db.execute(
            f"SELECT i.key, {columns}, i.probs, i.novelty, h.labels FROM images i "
            "LEFT JOIN human_labels h ON h.key = i.key "
            "WHERE i.run_model = ? ORDER BY i.study_instance_uid, i.key", (model,))
        for row in cur:
            hints = dict(zip(HINT_FIELDS, row[1 : 1 + len(HINT_FIELDS)]))
            probs = tuple(json.loads(row[-3]))
            human = tuple(json.loads(row[-1])) if row[-1] is not None else None
            yield ImageRecord(row[0], hints, probs, row[-2]), human

    def iter_errors(self, model: str) -> Iterator[dict[str, str]]:
        cur = self.db.execute("SELECT kind, path, unit, key, status, reason FROM errors WHERE run_model = ? "
                              "ORDER BY unit, key", (model,))
        for kind, path, unit, key, status, reason in cur:
            yield {"input": kind, "path": path, "unit": unit, "key": key, "status": status, "reason": reason}
