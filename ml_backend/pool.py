"""The labeling pool: a Label Studio project holds a bounded pool, not the whole archive.

``mammoflag import`` indexes the whole archive (manifest.csv with header hints, keys, patient_key).
The Label Studio project holds only a **pool**: at most ``MAMMOFLAG_POOL_SIZE`` unlabeled tasks,
plus every labelled task, forever. Everything Label Studio does per task (prediction import,
task listing, ``/next``, the score-ordered Data Manager view) then costs the same at 10k and at
1M archive images.

- **Cold start** (:func:`plan_cold_start`): before any model exists the first pool is a stratified
  sample of the archive: strata are (manufacturer, model, view position, laterality), served round
  robin, one image per study before a study's second, so every vendor and view is represented.
  Deterministic (the order inside a stratum is a hash of the key), streaming, memory bounded by
  strata x size.
- **Top-up** (:func:`plan_top_up`): after each new current version, a window of archive images not
  in the project is scored with it (:func:`read_window`: a rotating cursor, so each round costs at
  most ``MAMMOFLAG_POOL_WINDOW`` images, fewer when the round's time budget ``MAMMOFLAG_POOL_ROUND_S``
  runs out first, and every archive image is scored once per lap); the least
  certain and most diverse candidates fill free pool slots and replace *stale* pool tasks (unlabeled
  tasks the new version is surer of than of the candidate). Labelled tasks are never removed;
  removed tasks take their predictions with them.
- **Predictions**: only the pool is re-predicted; predictions of versions other than the current
  and the previous one are deleted (``ml_backend.tasks``), so prediction rows <= 2 x pool + labelled.

The state that must survive between rounds (which archives, the window cursor, the version last
topped up) is one JSON file per project under ``<data root>/.pools/`` (shared storage every worker
sees, like the images; ``setup-project`` never makes a storage on a dot-folder), written atomically.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from mammoflag.datadir import MANIFEST_FILE
from mammoflag.poolstate import (POOL_STATE_DIR, Cursor, PoolState, load_state, register_archives, save_state,
                                 state_path)

__all__ = ["POOL_STATE_DIR", "Candidate", "Cursor", "PoolState", "PoolTask", "TopUpPlan", "diverse_order",
           "iter_archive_rows", "load_state", "plan_cold_start", "plan_top_up", "read_window", "register_archives",
           "save_state", "state_path", "stratum_of", "Window"]
STRATUM_FIELDS = ("manufacturer", "model", "view_position", "laterality")


# -- cold start ----------------------------------------------------------------------------------

def _order_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()[:8]


def stratum_of(row: Mapping[str, str]) -> tuple[str, ...]:
    return tuple((row.get(f) or "").strip().upper() for f in STRATUM_FIELDS)


def plan_cold_start(manifest_rows: Iterable[Mapping[str, str]], size: int,
                    exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The keys of a stratified sample of ``size`` archive images (pure, deterministic, streaming).

    Strata (manufacturer, model, view, laterality) take turns, largest first; within a stratum
    images come in hash order, and a study already sampled waits until every other study of the
    stratum had its turn. Keys in ``exclude`` (already in the project) are left out.
    """
    if size <= 0:
        return []
    # per stratum: the `size` smallest (hash, key, study) -- a bounded heap, so memory is strata x size
    heaps: dict[tuple[str, ...], list[tuple[bytes, str, str]]] = {}
    counts: dict[tuple[str, ...], int] = {}
    for row in manifest_rows:
        key = row.get("key") or ""
        if not key or key in exclude:
            continue
        stratum = stratum_of(row)
        counts[stratum] = counts.get(stratum, 0) + 1
        heap = heaps.setdefault(stratum, [])
        item = (_neg(_order_hash(key)), key, row.get("study_instance_uid") or key)
        if len(heap) < size:
            heapq.heappush(heap, item)
        elif item > heap[0]:  # smaller hash than the largest kept (hashes are negated: max-heap)
            heapq.heapreplace(heap, item)
    queues: list[list[tuple[str, str]]] = []
    for stratum in sorted(heaps, key=lambda s: (-counts[s], s)):
        members = sorted((_neg(h), k, st) for h, k, st in heaps[stratum])
        queues.append(_study_interleaved([(k, st) for _, k, st in members]))
    out: list[str] = []
    seen_keys: set[str] = set()
    depth = 0
    while len(out) < size and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and q[depth][0] not in seen_keys:
                out.append(q[depth][0])
                seen_keys.add(q[depth][0])
                if len(out) >= size:
                    break
        depth += 1
    return out


def _neg(h: bytes) -> bytes:
    return bytes(255 - b for b in h)


def _study_interleaved(members: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Members in order, but each study's n-th image only after every study's (n-1)-th."""
    nth: dict[str, int] = {}
    ranked = []
    for i, (key, study) in enumerate(members):
        r = nth.get(study, 0)
        nth[study] = r + 1
        ranked.append((r, i, key, study))
    return [(k, s) for _, _, k, s in sorted(ranked)]


# -- top-up --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolTask:
    """A task of the project as the top-up sees it."""

    task_id: int
    key: str
    labelled: bool
    confidence: float | None  # the new version's (1 - max entropy); None: no prediction (unreadable image)
    study: str = ""
    removable: bool = True  # False: keep this round whatever its score (e.g. predicted by an interrupted run)


@dataclass(frozen=True)
class Candidate:
    """An archive image not in the project, scored by the new version."""

    key: str
    confidence: float
    study: str = ""
    image_hash: bytes | None = None


@dataclass(frozen=True)
class TopUpPlan:
    add: tuple[str, ...]  # candidate keys to import, best first
    remove: tuple[int, ...]  # task ids to delete (unlabeled, stale), stalest first

    @property
    def changes(self) -> int:
        return len(self.add) + len(self.remove)


def diverse_order(candidates: Sequence[Candidate], pool_studies: frozenset[str] | set[str] = frozenset()
                  ) -> list[Candidate]:
    """Candidates least certain first, but one per study (or image hash) before any study's second,
    and a study that already has an unlabeled task in the pool after every study that has none."""
    nth: dict[object, int] = {}
    ranked = []
    for c in sorted(candidates, key=lambda c: (c.confidence, c.key)):
        group: object = c.study or c.image_hash or c.key
        r = nth.get(group, 0) + (1 if c.study and c.study in pool_studies else 0)
        nth[group] = nth.get(group, 0) + 1
        if c.image_hash is not None and c.study:
            hr = nth.get(("hash", c.image_hash), 0)
            nth[("hash", c.image_hash)] = hr + 1
            r = max(r, hr)
        ranked.append((r, c.confidence, c.key, c))
    return [c for *_, c in sorted(ranked, key=lambda t: t[:3])]


def plan_top_up(pool: Sequence[PoolTask], candidates: Sequence[Candidate], bound: int,
                max_swaps: int | None = None) -> TopUpPlan:
    """What to add and remove so the pool holds ``bound`` unlabeled tasks, the least certain ones (pure).

    1. A pool over the bound (the bound was lowered) sheds its stalest unlabeled tasks.
    2. Free slots (annotators labelled pool tasks) are filled with the best candidates.
    3. Then the stalest unlabeled task is swapped for the best remaining candidate as long as the
       candidate is less certain than it (at most ``max_swaps`` swaps). A task without a prediction
       (its image could not be read) is the stalest of all. Labelled tasks are never touched.
    """
    unlabeled = [t for t in pool if not t.labelled]
    in_project = {t.key for t in pool}
    fresh = [c for c in diverse_order([c for c in candidates if c.key not in in_project],
                                      {t.study for t in unlabeled if t.study}) ]
    seen: set[str] = set()
    queue = []
    for c in fresh:
        if c.key not in seen:
            seen.add(c.key)
            queue.append(c)

    def staleness(t: PoolTask) -> tuple[float, int]:
        return (2.0 if t.confidence is None else t.confidence, t.task_id)

    stale = sorted((t for t in unlabeled if t.removable), key=staleness, reverse=True)
    remove: list[int] = []
    add: list[str] = []
    excess = len(unlabeled) - bound
    while excess > 0 and stale:
        remove.append(stale.pop(0).task_id)
        excess -= 1
    free = max(0, bound - len(unlabeled))
    while free > 0 and queue:
        add.append(queue.pop(0).key)
        free -= 1
    swaps = 0
    limit = len(queue) if max_swaps is None else max_swaps
    for best in queue:  # in diverse order; a candidate not less certain than the stalest task is passed over
        if not stale or swaps >= limit:
            break
        worst = stale[0]
        if worst.confidence is not None and best.confidence >= worst.confidence:
            continue
        remove.append(stale.pop(0).task_id)
        add.append(best.key)
        swaps += 1
    return TopUpPlan(tuple(add), tuple(remove))


# -- the archive window (the pool's state file is core: mammoflag/poolstate.py) ------------------

def _manifest_header(path: Path) -> tuple[list[str], int]:
    with open(path, "rb") as fh:
        line = fh.readline()
    return next(csv.reader([line.decode("utf-8")])), len(line)


def _valid_offset(fh, offset: int, header_len: int, size: int) -> bool:
    if offset <= header_len or offset > size:
        return offset == header_len or offset == 0
    fh.seek(offset - 1)
    return fh.read(1) == b"\n"


def iter_archive_rows(data_root: Path, archive: str, offset: int = 0) -> Iterator[tuple[dict[str, str], int]]:
    """(row, byte offset after it) of one archive's manifest.csv from ``offset``, streaming.

    Rows are single lines (the importer's header text has no control characters); an offset that
    does not fall on a line start (the manifest was rewritten) starts over at the first row.
    """
    path = Path(data_root) / archive / MANIFEST_FILE
    header, header_len = _manifest_header(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if not _valid_offset(fh, offset, header_len, size):
            offset = 0
        fh.seek(max(offset, header_len))
        pos = fh.tell()
        for line in iter(fh.readline, b""):
            pos += len(line)
            text = line.decode("utf-8")
            if not text.strip():
                continue
            values = next(csv.reader(io.StringIO(text)))
            yield dict(zip(header, values)), pos


@dataclass(frozen=True)
class Window:
    """A round's archive window: ``rows`` as ``(archive, row)``, and where the cursor stands after each.

    A round that scores only the first ``k`` rows (its time budget ran out) moves the cursor by
    :meth:`cut` ``(k)``, so the rows it did not score come first in the next round's window.
    """

    rows: list[tuple[str, dict[str, str]]]
    after: list[tuple[Cursor, int]]  # (cursor after row i, manifest rows read up to it)
    start: Cursor
    cursor: Cursor  # after the whole window (excluded rows past the last one included)
    read: int

    def cut(self, k: int) -> tuple[Cursor, int]:
        """(cursor, rows read) of a round that scored only ``rows[:k]``."""
        if k >= len(self.rows):
            return self.cursor, self.read
        return self.after[k - 1] if k > 0 else (self.start, 0)


def read_window(data_root: Path, state: PoolState, n: int, exclude: set[str] | frozenset[str]) -> Window:
    """The next ``n`` archive rows from the cursor, wrapping round; rows whose key is in ``exclude``
    (already in the project) are passed over without counting.

    Never more than one lap per round: an archive smaller than ``n`` is read once, and the cursor
    ends where it started.
    """
    if not state.archives or n <= 0:
        return Window([], [], state.cursor, state.cursor, 0)
    cur = state.cursor if state.cursor.archive < len(state.archives) else Cursor(laps=state.cursor.laps)
    count = len(state.archives)
    # one lap: the rest of the cursor's archive, the archives after it, wrap, those before it, and
    # the cursor's archive up to the cursor
    segments: list[tuple[int, int, int | None, int]] = [(cur.archive, cur.offset, None, cur.laps)]
    laps = cur.laps
    for step in range(1, count + 1):
        a = (cur.archive + step) % count
        if a == 0:
            laps += 1
        segments.append((a, 0, cur.offset if a == cur.archive else None, laps))
    out: list[tuple[str, dict[str, str]]] = []
    after: list[tuple[Cursor, int]] = []
    seen: set[str] = set()
    read = 0
    position = cur
    for a, offset, until, lap in segments:
        if until is not None and until <= 0:
            break
        position = Cursor(a, offset, lap)
        for row, pos in iter_archive_rows(data_root, state.archives[a], offset):
            if until is not None and pos > until:
                break
            read += 1
            position = Cursor(a, pos, lap)
            key = row.get("key") or ""
            if key and key not in exclude and key not in seen:
                seen.add(key)
                out.append((state.archives[a], row))
                after.append((position, read))
                if len(out) >= n:
                    return Window(out, after, state.cursor, position, read)
    return Window(out, after, state.cursor, position, read)
