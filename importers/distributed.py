"""``mammoflag import --distributed``: the archive's files in shards, normalized by Celery workers.

The same file protocol as ``mammoflag flag --distributed`` (flagger/distributed.py) and the same
coordinator loop, both in the core (:func:`mammoflag.shards.coordinate_shards`; this module gives it
the importer's part: shard files, outcomes, merge in shard order). Workers share the storage the
coordinator uses (the DICOM folder and the DATA_DIR); a job folder lives in the DATA_DIR:

    DATA_DIR/.import-jobs/<job id>/
      shards/<n>.jsonl       the shard's files (paths and options; no secret: workers have their own)
      heartbeats/<n>         rewritten by the worker after every file: "still alive"
      results/<n>.jsonl      one outcome per file, written to a temp file and renamed: whole or absent

A worker normalizes a shard's files exactly as a local run's decode processes do (``_convert_file``
inside :func:`mammoflag.pool.isolated_map`, so a decoder crash fails one file) and writes the display
PNGs under temporary names; the coordinator merges outcomes **in shard order**, through the same
``_RunState.finish`` a local run uses (rename into place, dedupe, manifest row, one report row per
input file), so the DATA_DIR equals a local run's. A shard whose task failed, or whose heartbeat went
stale (a machine gone), is sent again; a worker killed mid-shard also leaves its message to Celery
(acks late) for another worker. A shard run twice is harmless: the second attempt's result replaces
the first before it is read, or finds the job gone; temporary PNGs of a lost attempt are swept at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from mammoflag.datadir import HeaderHints
from mammoflag.dicom.types import ImportStatus, NormalizeOptions
from mammoflag.fileio import atomic_path, atomic_write, atomic_write_lines, sweep_partials
from mammoflag.jobs import Queues, TaskName
from mammoflag.shards import (CoordinatorOptions, MergeOrder, ShardJob, ShardPaths, ShardStage, coordinate_shards,
                              new_job_dir)

log = logging.getLogger(__name__)

TASK_NAME = TaskName.IMPORT_SHARD.value
QUEUE = Queues.FLAGGING.value  # the bulk-work queue: import and flag shards share the same workers
JOBS_DIR = ".import-jobs"


@dataclass(frozen=True)
class DistributedImportOptions:
    shard_size: int = 200  # files per shard (a full-field DICOM takes ~0.1-0.2 s: ~30 s a shard)
    max_outstanding: int = 32  # shards sent and not merged yet: bounds the broker queue and the disk of temp PNGs
    stall_timeout_s: float = 300.0  # a started shard silent this long is sent again
    max_attempts: int = 3  # sends per shard before its files are reported as failed
    poll_s: float = 0.5
    workers_per_shard: int = 1  # decode processes a worker uses for a shard


@dataclass(frozen=True)
class ImportShardJob(ShardPaths):
    job_dir: str
    shard: int
    workers: int = 1

    def to_json(self) -> dict:
        return asdict(self)



# -- (de)serialising the importer's job and outcome ---------------------------------------------

def job_to_json(job) -> dict:
    return {"path": job.path, "rel": job.rel, "images_dir": job.images_dir, "options": asdict(job.options),
            "known": list(job.known), "problem": job.problem}


def job_from_json(d: dict, secret: str):
    from importers.run import _Job

    return _Job(d["path"], d["rel"], d["images_dir"], NormalizeOptions(**d["options"]), secret,
                tuple(d.get("known") or ("", "")), d.get("problem") or "")


def outcome_to_json(o) -> dict:
    return {"rel": o.rel, "status": str(o.status), "reason": o.reason,
            "hints": o.hints.as_dict() if o.hints is not None else None,
            "frames": [list(f) for f in o.frames], "notes": list(o.notes)}


def outcome_from_json(d: dict):
    from importers.run import _Outcome

    hints = None
    if d.get("hints") is not None:
        names = {f.name for f in fields(HeaderHints)}
        h: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["hints"].items() if k in names}
        hints = HeaderHints(**h)
    return _Outcome(d["rel"], ImportStatus(d["status"]), d.get("reason", ""), hints,
                    [(int(f), str(p)) for f, p in d.get("frames") or []], list(d.get("notes") or []))


# -- the coordinator (the loop is mammoflag.shards.coordinate_shards) ---------------------------

def celery_job_runner(app, out_dir: Path, options: DistributedImportOptions = DistributedImportOptions()):
    """A job runner for ``import_dicoms(..., job_runner=...)``: ``(jobs) -> iterator of (job, outcome)`` in order."""

    def run(jobs: Iterable) -> Iterator[tuple[Any, Any]]:
        yield from run_shards(app, jobs, Path(out_dir), options)

    return run


def run_shards(app, jobs: Iterable, out_dir: Path, options: DistributedImportOptions) -> Iterator[tuple[Any, Any]]:
    """The importer's files in shards of ``shard_size``; ``(job, outcome)`` merged in shard order, so the report
    and the manifest come out as a local run writes them."""
    jobs_root = Path(out_dir) / JOBS_DIR
    job_dir = new_job_dir(jobs_root)  # an earlier coordinator's files are pending again (the report decides)

    def start(job_dir: Path, n: int, chunk: list) -> ImportShardJob:
        shard = ImportShardJob(str(job_dir), n, options.workers_per_shard)
        atomic_write_lines(shard.units_path, (job_to_json(j) for j in chunk))
        return shard

    def results(shard: ShardJob, chunk: list) -> Iterator[tuple[Any, Any]]:
        return zip(chunk, _read_outcomes(shard.result_path))

    def give_up(shard: ShardJob, chunk: list, why: str, attempts: int) -> None:
        with atomic_path(shard.result_path) as tmp:
            Path(tmp).write_text("".join(json.dumps(outcome_to_json(_failed(j, why))) + "\n" for j in chunk))

    stage: ShardStage[list, tuple[Any, Any]] = ShardStage(TASK_NAME, QUEUE, "import shard", start, results, give_up)
    coordinator = CoordinatorOptions(options.max_outstanding, options.stall_timeout_s, options.max_attempts,
                                     options.poll_s)
    try:
        yield from coordinate_shards(app, _chunks(jobs, options.shard_size), job_dir, stage, coordinator,
                                     MergeOrder.SHARD_ORDER)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
        if jobs_root.exists() and not any(jobs_root.iterdir()):
            jobs_root.rmdir()
        sweep_partials(Path(out_dir) / "images")  # a lost attempt's temporary PNGs


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    source = iter(items)
    while chunk := [j for _, j in zip(range(size), source)]:
        yield chunk


def _failed(job, why: str):
    from importers.run import _Outcome

    return _Outcome(job.rel, ImportStatus.FAILED, f"distributed import shard failed ({why})")


def _read_outcomes(path: Path) -> Iterator:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield outcome_from_json(json.loads(line))



# -- the worker side ----------------------------------------------------------------------------

def run_import_shard(job: ImportShardJob, patient_key_secret: str) -> dict:
    """Normalize one shard's files and write the outcomes atomically (the Celery task's body).

    The work runs in a fresh child process (``python -m importers.distributed``): a Celery prefork
    child is daemonic and may not start the crash-isolating decode processes itself. The child dies
    with this process; the secret goes to it in its environment, never on a command line.
    """
    import subprocess
    import sys

    if job.result_path.exists():
        return {"shard": job.shard, "status": "already done"}
    if not job.units_path.exists():
        return {"shard": job.shard, "status": "job gone"}
    env = {**os.environ, SECRET_ENV: patient_key_secret}
    proc = subprocess.run([sys.executable, "-m", "importers.distributed", json.dumps(job.to_json())], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"import shard {job.shard}: the shard process exited with {proc.returncode}: "
                           f"{proc.stderr[-500:]}")
    return {"shard": job.shard, "status": "done"}


SECRET_ENV = "MAMMOFLAG_PATIENT_KEY_SECRET"


def _run_here(job: ImportShardJob, patient_key_secret: str) -> None:
    from importers.run import _convert_file, _crashed, _worker_setup
    from mammoflag.pool import _die_with_parent, isolated_map

    _die_with_parent(os.getppid())
    with open(job.units_path, encoding="utf-8") as fh:
        jobs = [job_from_json(json.loads(line), patient_key_secret) for line in fh]
    beat: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "files": len(jobs), "done": 0}
    atomic_write(job.heartbeat_path, json.dumps(beat))
    with atomic_path(job.result_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for _, outcome in isolated_map(_convert_file, jobs, workers=max(1, job.workers), crashed=_crashed,
                                       window=max(1, job.workers) * 4, ordered=True, initializer=_worker_setup):
            out.write(json.dumps(outcome_to_json(outcome)) + "\n")
            beat["done"] += 1
            atomic_write(job.heartbeat_path, json.dumps(beat))
        out.flush()
        os.fsync(out.fileno())


if __name__ == "__main__":
    import sys

    _run_here(ImportShardJob(**json.loads(sys.argv[1])), os.environ[SECRET_ENV])
