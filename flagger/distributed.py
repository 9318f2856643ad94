"""``--distributed``: the pending units split into shards, run as Celery tasks on any workers.

Workers share the storage the coordinator uses (input, model registry, and a job folder
beside the checkpoint). The protocol is files, so it survives any worker dying:

    <checkpoint>.jobs/<job id>/
      shards/<n>.jsonl       the shard's units, written before its task is sent
      heartbeats/<n>         rewritten by the worker after every batch: "still alive"
      results/<n>.jsonl      the shard's results, written to a temp file and renamed: whole or absent

A shard's task is acked late, so a worker killed mid-shard leaves its message to be
delivered again; independently, the coordinator sends a shard again when its heartbeat
goes stale (a whole machine gone) or its task failed. Running a shard twice is harmless:
a worker skips a shard whose result exists, the rename is atomic, and the checkpoint
ignores units it already has. So results merge with no loss and no duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from flagger.records import Problem, UnitKind, UnitResult, WorkUnit
from flagger.sources import study_of_unit
from mammoflag.fileio import atomic_path, atomic_write, atomic_write_lines
from mammoflag.jobs import Queues, TaskName
from mammoflag.shards import ShardPaths, mtime, why_resend

log = logging.getLogger(__name__)

TASK_NAME = TaskName.FLAG_SHARD.value
QUEUE = Queues.FLAGGING.value


@dataclass(frozen=True)
class ShardJob(ShardPaths):
    """The Celery task's argument: where the shard is and how to classify it (JSON, no secrets)."""

    job_dir: str
    shard: int
    input_kind: UnitKind
    model_path: str
    model_file: str
    model_version: str
    batch_size: int
    display_long_side: int
    ort_threads: int | None = None
    dicomweb_url: str = ""  # DICOMweb input: the archive (dicomweb+http(s)://...); workers use their own credentials

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ShardJob":
        return cls(**{**d, "input_kind": UnitKind(d["input_kind"])})



@dataclass(frozen=True)
class DistributedOptions:
    shard_size: int = 2000  # units per shard (~25 s of work for one worker at 85 images/s)
    max_outstanding: int = 64  # shards sent and not merged yet: bounds the broker queue and memory
    stall_timeout_s: float = 300.0  # a started shard silent this long is sent again
    max_attempts: int = 3  # sends per shard before its units are reported as failed
    poll_s: float = 0.5
    ort_threads: int | None = None


@dataclass
class _Outstanding:
    job: ShardJob
    task_id: str
    sent_at: float
    attempts: int = 1
    last_seen: float = field(default=0.0)


def celery_runner(app, options: DistributedOptions = DistributedOptions()):
    """A RemoteRunner for flag_cohort that runs shards on the Celery app's workers."""

    def run(pending: Iterable[WorkUnit], flag_job) -> Iterator[list[UnitResult]]:
        yield from run_shards(app, pending, flag_job, options)

    return run


def run_shards(app, pending: Iterable[WorkUnit], flag_job, options: DistributedOptions) -> Iterator[list[UnitResult]]:
    jobs_root = Path(f"{flag_job.checkpoint_path}.jobs")
    # Folders of an earlier coordinator: their units are pending again (the checkpoint decides),
    # and tasks still queued for them find their folder gone and return at once.
    if jobs_root.exists():
        shutil.rmtree(jobs_root, ignore_errors=True)
    job_dir = jobs_root / uuid.uuid4().hex[:12]
    for sub in ("shards", "results", "heartbeats"):
        (job_dir / sub).mkdir(parents=True)
    log.info("distributed job %s: shards of %d units", job_dir.name, options.shard_size)

    units = iter(pending)
    held: list[WorkUnit] = []  # a unit read past a shard's end, first of the next
    dicomweb_url = str(flag_job.input_path) if flag_job.input_kind is UnitKind.DICOMWEB else ""
    outstanding: dict[int, _Outstanding] = {}
    next_shard = 0
    exhausted = False
    last_activity = time.monotonic()
    try:
        while True:
            while not exhausted and len(outstanding) < options.max_outstanding:
                chunk = _take_shard(units, options.shard_size, held)
                if not chunk:
                    exhausted = True
                    break
                job = ShardJob(str(job_dir), next_shard, flag_job.input_kind, str(flag_job.model_path),
                               flag_job.model_file, flag_job.model_version, flag_job.batch_size,
                               flag_job.display_long_side, options.ort_threads, dicomweb_url)
                atomic_write_lines(job.units_path, (u.to_json() for u in chunk))
                outstanding[next_shard] = _Outstanding(job, _send(app, job), time.monotonic())
                next_shard += 1
            if exhausted and not outstanding:
                return
            finished = [n for n, o in outstanding.items() if o.job.result_path.exists()]
            for n in finished:
                o = outstanding.pop(n)
                yield from _read_results(o.job.result_path)
                _remove_shard_files(o.job)
                last_activity = time.monotonic()
            if finished:
                continue
            now = time.monotonic()
            for n, o in list(outstanding.items()):
                beat = mtime(o.job.heartbeat_path)
                if beat is not None and beat > o.last_seen:
                    o.last_seen = beat
                    last_activity = now
            for n, o in list(outstanding.items()):
                why = _why_resend(app, o, now, last_activity, options)
                if not why:
                    continue
                if o.attempts >= options.max_attempts:
                    log.warning("shard %d: %s after %d attempts; its units go to the errors file", n, why, o.attempts)
                    outstanding.pop(n)
                    yield _failed_shard(o.job, f"distributed shard failed {o.attempts} times ({why})")
                    _remove_shard_files(o.job)
                    continue
                log.warning("shard %d: %s; sending it again", n, why)
                o.attempts += 1
                o.task_id = _send(app, o.job)
                o.sent_at = now
                last_activity = now
            time.sleep(options.poll_s)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _take_shard(units: Iterator[WorkUnit], size: int, held: list[WorkUnit]) -> list[WorkUnit]:
    """The next shard: ``size`` units, or more so that a DICOMweb study is never split between shards."""
    chunk, study = held[:], None
    held.clear()
    for unit in units:
        if len(chunk) >= size:
            study = study_of_unit(unit)
            if study is None or study != study_of_unit(chunk[-1]):
                held.append(unit)
                break
        chunk.append(unit)
    return chunk


def _why_resend(app, o: _Outstanding, now: float, last_activity: float, options: DistributedOptions) -> str:
    return why_resend(app, o.task_id, o.job.heartbeat_path, o.sent_at, now, last_activity, options.stall_timeout_s)

def _send(app, job: ShardJob) -> str:
    return app.send_task(TASK_NAME, args=[job.to_json()], queue=QUEUE).id


def _read_results(path: Path, batch: int = 256) -> Iterator[list[UnitResult]]:
    out: list[UnitResult] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(UnitResult.from_json(json.loads(line)))
            if len(out) >= batch:
                yield out
                out = []
    if out:
        yield out


def _failed_shard(job: ShardJob, reason: str) -> list[UnitResult]:
    with open(job.units_path, encoding="utf-8") as f:
        return [UnitResult(WorkUnit.from_json(json.loads(line)), problem=Problem("failed", reason)) for line in f]


def _remove_shard_files(job: ShardJob) -> None:
    for p in (job.units_path, job.result_path, job.heartbeat_path):
        p.unlink(missing_ok=True)



# --- the worker side -------------------------------------------------------------------------

def run_shard(job: ShardJob, classifier, patient_key_secret: str | None, dicomweb=None) -> dict:
    """Classify one shard in this process and write its results atomically; idempotent.

    ``dicomweb`` (a :class:`flagger.sources.DicomWebInput` with this worker's credentials) is where a
    DICOMweb shard's instances are retrieved from.
    """
    from flagger.pipeline import classified_batches, prepared_units
    from flagger.sources import PrepareContext

    if job.result_path.exists():
        return {"shard": job.shard, "status": "already done"}
    if not job.units_path.exists():
        return {"shard": job.shard, "status": "job gone"}
    if classifier.version.name != job.model_version or classifier.model_path.name != job.model_file:
        raise RuntimeError(f"shard {job.shard}: worker loaded {classifier.name}/{classifier.model_path.name}, "
                           f"job wants {job.model_version}/{job.model_file}")
    with open(job.units_path, encoding="utf-8") as f:
        units = [WorkUnit.from_json(json.loads(line)) for line in f]
    ctx = PrepareContext(classifier.spec.input_size, job.display_long_side,
                         patient_key_secret if job.input_kind in (UnitKind.DICOM, UnitKind.DICOMWEB) else None,
                         dicomweb=dicomweb)
    beat = {"host": socket.gethostname(), "pid": os.getpid(), "units": len(units), "done": 0}
    atomic_write(job.heartbeat_path, json.dumps(beat))
    n_images = 0
    with atomic_path(job.result_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for results in classified_batches(prepared_units(units, ctx, workers=0), classifier, job.batch_size):
            for r in results:
                out.write(json.dumps(r.to_json()) + "\n")
                n_images += len(r.images)
            beat["done"] += len(results)
            atomic_write(job.heartbeat_path, json.dumps(beat))
        out.flush()
        os.fsync(out.fileno())
    return {"shard": job.shard, "status": "done", "units": len(units), "images": n_images}
