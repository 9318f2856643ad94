"""The shard file protocol shared by distributed import and distributed flagging.

A coordinator writes each shard's units to ``<job dir>/shards/<n>.jsonl`` on storage every
worker sees and sends a Celery task naming it; the worker touches ``heartbeats/<n>`` while it
works and writes ``results/<n>.jsonl`` atomically when done. The coordinator
(:func:`coordinate_shards`, one loop for both stages; what differs is a :class:`ShardStage` of
callbacks) merges results in shard order or as they finish, and sends a shard again when its
task failed or its heartbeat went stale.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Generic, Iterable, Iterator, Protocol, TypeVar

log = logging.getLogger(__name__)


class ShardPaths:
    """The three files of one shard; mixed into a frozen job dataclass with ``job_dir`` and ``shard``."""

    job_dir: str
    shard: int

    @property
    def units_path(self) -> Path:
        return Path(self.job_dir) / "shards" / f"{self.shard:06d}.jsonl"

    @property
    def result_path(self) -> Path:
        return Path(self.job_dir) / "results" / f"{self.shard:06d}.jsonl"

    @property
    def heartbeat_path(self) -> Path:
        return Path(self.job_dir) / "heartbeats" / f"{self.shard:06d}"


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def why_resend(app, task_id: str, heartbeat: Path, sent_at: float, now: float, last_activity: float,
               stall_timeout_s: float) -> str:
    """Why a shard must be sent again ("" when it must not): its task failed, or it stalled."""
    result = app.AsyncResult(task_id)
    if result.state == "FAILURE":
        # The worker's own error (a missing secret, an unreadable model), never a file's content:
        # per-file problems are results, not task failures.
        return f"its task failed: {type(result.result).__name__}: {str(result.result)[:300]}"
    beat = mtime(heartbeat)
    # A started shard's wall clock vs. the heartbeat file's mtime: both are this host's view
    # of shared storage; compare the heartbeat's age by wall clock.
    if beat is not None:
        age = time.time() - beat
        if age > stall_timeout_s and now - sent_at > stall_timeout_s:
            return f"no heartbeat for {age:.0f}s"
        return ""
    # Not started: normal while workers are busy; suspicious only when nothing anywhere moved.
    if now - last_activity > stall_timeout_s and now - sent_at > stall_timeout_s:
        return f"not started and no progress anywhere for {now - last_activity:.0f}s"
    return ""


# -- the coordinator loop (distributed import and distributed flagging) --------------------------

C = TypeVar("C")  # a shard's units, as the stage holds them (a list of files, of work units)
R = TypeVar("R")  # what the stage yields from a finished shard


class ShardJob(Protocol):
    """A stage's shard job: its files (:class:`ShardPaths`) and the Celery task argument."""

    @property
    def units_path(self) -> Path: ...

    @property
    def result_path(self) -> Path: ...

    @property
    def heartbeat_path(self) -> Path: ...

    def to_json(self) -> dict: ...


class MergeOrder(Enum):
    SHARD_ORDER = "shard order"  # a finished shard waits for every earlier one (the importer's report order)
    AS_FINISHED = "as finished"  # whatever finished first (the flagger's checkpoint does not care)


@dataclass(frozen=True)
class CoordinatorOptions:
    max_outstanding: int  # shards sent and not merged yet: bounds the broker queue, memory and temp files
    stall_timeout_s: float = 300.0  # a started shard silent this long is sent again
    max_attempts: int = 3  # sends per shard before the stage's give_up() fails its units
    poll_s: float = 0.5


@dataclass(frozen=True)
class ShardStage(Generic[C, R]):
    """The stage-specific part of a coordinator, as callbacks.

    ``start(job_dir, n, chunk)``: the job of shard ``n``, its units file written; ``results(job, chunk)``:
    what a finished shard yields, read from its result file; ``give_up(job, chunk, why, attempts)``: write
    the shard's result file saying every unit failed (it is then merged like any result).
    """

    task_name: str
    queue: str
    label: str  # for log lines: "import shard", "shard"
    start: Callable[[Path, int, C], ShardJob]
    results: Callable[[ShardJob, C], Iterator[R]]
    give_up: Callable[[ShardJob, C, str, int], None]


@dataclass
class _Outstanding(Generic[C]):
    job: ShardJob
    chunk: C
    task_id: str
    sent_at: float
    attempts: int = 1
    last_seen: float = 0.0


def new_job_dir(jobs_root: Path) -> Path:
    """A fresh job folder (``shards/``, ``results/``, ``heartbeats/``) under ``jobs_root``; an earlier
    coordinator's folders are removed first (their units are pending again: the stage's checkpoint or
    report decides, and tasks still queued for them find their folder gone and return at once)."""
    if jobs_root.exists():
        shutil.rmtree(jobs_root, ignore_errors=True)
    job_dir = jobs_root / uuid.uuid4().hex[:12]
    for sub in ("shards", "results", "heartbeats"):
        (job_dir / sub).mkdir(parents=True)
    return job_dir


def coordinate_shards(app, chunks: Iterable[C], job_dir: Path, stage: ShardStage[C, R], options: CoordinatorOptions,
                      order: MergeOrder) -> Iterator[R]:
    """Send each chunk as a shard task, merge finished shards (in ``order``), send a shard again when its
    task failed or it stalled (at most ``max_attempts`` sends, then ``give_up``); removes ``job_dir`` at the end."""
    source = iter(chunks)
    outstanding: dict[int, _Outstanding[C]] = {}
    next_shard = next_merge = 0
    exhausted = False
    last_activity = time.monotonic()

    def send(job: ShardJob) -> str:
        return app.send_task(stage.task_name, args=[job.to_json()], queue=stage.queue).id

    try:
        while True:
            while not exhausted and len(outstanding) < options.max_outstanding:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                job = stage.start(job_dir, next_shard, chunk)
                outstanding[next_shard] = _Outstanding(job, chunk, send(job), time.monotonic())
                next_shard += 1
            if exhausted and not outstanding:
                return
            if order is MergeOrder.SHARD_ORDER:
                finished: list[int] = []
                while next_merge + len(finished) in outstanding and \
                        outstanding[next_merge + len(finished)].job.result_path.exists():
                    finished.append(next_merge + len(finished))
                next_merge += len(finished)
            else:
                finished = [n for n, o in outstanding.items() if o.job.result_path.exists()]
            for n in finished:
                o = outstanding.pop(n)
                yield from stage.results(o.job, o.chunk)
                for p in (o.job.units_path, o.job.result_path, o.job.heartbeat_path):
                    p.unlink(missing_ok=True)
                last_activity = time.monotonic()
            if finished:
                continue
            now = time.monotonic()
            for o in outstanding.values():
                beat = mtime(o.job.heartbeat_path)
                if beat is not None and beat > o.last_seen:
                    o.last_seen = beat
                    last_activity = now
            for n, o in list(outstanding.items()):
                if o.job.result_path.exists():  # done, waiting for its turn to merge
                    continue
                why = why_resend(app, o.task_id, o.job.heartbeat_path, o.sent_at, now, last_activity,
                                 options.stall_timeout_s)
                if not why:
                    continue
                if o.attempts >= options.max_attempts:
                    log.warning("%s %d: %s after %d attempts; its units fail", stage.label, n, why, o.attempts)
                    stage.give_up(o.job, o.chunk, why, o.attempts)
                    continue
                log.warning("%s %d: %s; sending it again", stage.label, n, why)
                o.attempts += 1
                o.task_id = send(o.job)
                o.sent_at = now
                last_activity = now
            time.sleep(options.poll_s)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
