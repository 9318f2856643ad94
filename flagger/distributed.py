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
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from flagger.records import Problem, UnitKind, UnitResult, WorkUnit
from flagger.sources import study_of_unit
from mammoflag.fileio import atomic_path, atomic_write, atomic_write_lines
from mammoflag.jobs import Queues, TaskName
from mammoflag.shards import CoordinatorOptions, MergeOrder, ShardPaths, ShardStage, coordinate_shards, new_job_dir
from mammoflag.shards import ShardJob as ShardFiles

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


def celery_runner(app, options: DistributedOptions = DistributedOptions()):
    """A RemoteRunner for flag_cohort that runs shards on the Celery app's workers."""

    def run(pending: Iterable[WorkUnit], flag_job) -> Iterator[list[UnitResult]]:
        yield from run_shards(app, pending, flag_job, options)

    return run


def run_shards(app, pending: Iterable[WorkUnit], flag_job, options: DistributedOptions) -> Iterator[list[UnitResult]]:
    """Shards of ``shard_size`` units (a DICOMweb study never split), merged as they finish (the checkpoint
    keys every result); the loop is :func:`mammoflag.shards.coordinate_shards`."""
    job_dir = new_job_dir(Path(f"{flag_job.checkpoint_path}.jobs"))
    log.info("distributed job %s: shards of %d units", job_dir.name, options.shard_size)
    dicomweb_url = str(flag_job.input_path) if flag_job.input_kind is UnitKind.DICOMWEB else ""

    def start(job_dir: Path, n: int, chunk: list[WorkUnit]) -> ShardJob:
        job = ShardJob(str(job_dir), n, flag_job.input_kind, str(flag_job.model_path), flag_job.model_file,
                       flag_job.model_version, flag_job.batch_size, flag_job.display_long_side, options.ort_threads,
                       dicomweb_url)
        atomic_write_lines(job.units_path, (u.to_json() for u in chunk))
        return job

    def results(job: ShardFiles, chunk: list[WorkUnit]) -> Iterator[list[UnitResult]]:
        return _read_results(job.result_path)

    def give_up(job: ShardFiles, chunk: list[WorkUnit], why: str, attempts: int) -> None:
        # the units go to the errors file: their failure is the shard's result, merged like any other
        reason = f"distributed shard failed {attempts} times ({why})"
        with atomic_path(job.result_path) as tmp:
            Path(tmp).write_text("".join(json.dumps(UnitResult(u, problem=Problem("failed", reason)).to_json()) + "\n"
                                         for u in chunk))

    stage: ShardStage[list[WorkUnit], list[UnitResult]] = ShardStage(TASK_NAME, QUEUE, "shard", start, results,
                                                                     give_up)
    coordinator = CoordinatorOptions(options.max_outstanding, options.stall_timeout_s, options.max_attempts,
                                     options.poll_s)
    yield from coordinate_shards(app, _shards(iter(pending), options.shard_size), job_dir, stage, coordinator,
                                 MergeOrder.AS_FINISHED)


def _shards(units: Iterator[WorkUnit], size: int) -> Iterator[list[WorkUnit]]:
    held: list[WorkUnit] = []  # a unit read past a shard's end, first of the next
    while chunk := _take_shard(units, size, held):
        yield chunk


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
    beat: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "units": len(units), "done": 0}
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
