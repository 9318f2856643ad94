"""Scoring many tasks at once (a pool round: the pool plus the archive window) on every core.

:func:`predict_tasks_in_processes` is :func:`ml_backend.predictor.predict_tasks` spread over
``workers`` of the core's crash-isolating processes (:func:`mammoflag.pool.isolated_map`): each
process loads the version's ONNX model once, on one thread, and decodes and predicts whole
chunks, so both cores work on PNG decoding, the model input and the model at the same time
(one process with a two-thread ONNX session leaves a core idle while it decodes). A chunk whose
image kills its process is retried task by task; the culprit gets an error prediction.

A Celery prefork child is a daemonic process, which may not start processes of its own; there
the same work runs in a fresh interpreter (``python -m ml_backend.scoring``, killed with its
parent) that starts them, and hands the predictions back through a private temporary folder.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mammoflag.inference import OnnxClassifier
from mammoflag.pool import isolated_map, run_alone
from mammoflag.registry import ModelVersion, read_version
from mammoflag.spec import ModelSpec
from ml_backend.predictor import InputCache, TaskPrediction, _task_id, predict_tasks, warm_input_cache

SCORING_CHUNK = 32  # tasks per process call: one ONNX batch, small enough that every process stays busy
MAX_WORKERS = 4


def scoring_workers(requested: int) -> int:
    """Scoring processes: as asked (>= 1), else one per core, at most 4 (each holds an ONNX session and a
    chunk of decoded images, ~150-250 MB, so a round stays under 1 GB resident on a many-core worker)."""
    return requested if requested > 0 else max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@dataclass(frozen=True)
class ScoringJob:
    """What a scoring process needs for a chunk of tasks (paths only: it loads the model itself)."""

    version_path: str
    data_root: str
    with_image_hash: bool = False


@dataclass(frozen=True)
class ScoringGroup:
    """Tasks to score, and the model-input cache they use (None: made afresh and not kept).

    ``deadline`` (a ``time.monotonic()`` instant; CLOCK_MONOTONIC is one clock for every process on
    the machine, so it holds in the child interpreter too): no chunk of this group is started after
    it, and the group's predictions are then those of a prefix of its tasks. None: every task.
    """

    tasks: Sequence[Mapping[str, Any]]
    cache: InputCache | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class _Chunk:
    tasks: list[Mapping[str, Any]]
    cache: InputCache | None


@functools.cache
def _process_model(version_path: str) -> OnnxClassifier:
    """The version's ONNX session in this scoring process, loaded on its first chunk (one thread: the
    processes are the parallelism)."""
    return OnnxClassifier(read_version(Path(version_path)), threads=1)


def _score_chunk(item: _Chunk, job: ScoringJob) -> list[TaskPrediction]:
    return predict_tasks(item.tasks, _process_model(job.version_path), Path(job.data_root),
                         chunk=max(1, len(item.tasks)), with_image_hash=job.with_image_hash, cache=item.cache)


def _crashed_chunk(item: _Chunk, job: ScoringJob, version: str) -> list[TaskPrediction]:
    """A chunk that killed a fresh process too: each task alone in a process; the culprit gets an error."""
    def crashed(single: _Chunk) -> list[TaskPrediction]:
        task_id = _task_id(single.tasks[0])
        return [TaskPrediction(task_id=task_id, model_version=version,
                               error=f"task {task_id}: scoring its image crashed the process (malformed file?)")]

    if len(item.tasks) == 1:
        return crashed(item)
    return [p for t in item.tasks
            for p in run_alone(functools.partial(_score_chunk, job=job), _Chunk([t], item.cache), crashed)]


def _score_item(item: tuple[int, _Chunk], job: ScoringJob) -> list[TaskPrediction]:
    return _score_chunk(item[1], job)


def _crashed_item(item: tuple[int, _Chunk], job: ScoringJob, version: str) -> list[TaskPrediction]:
    return _crashed_chunk(item[1], job, version)


def _chunks(groups: Sequence[ScoringGroup], chunk: int) -> Iterator[tuple[int, _Chunk]]:
    """The groups' chunks in order, taken lazily (as processes free up), so a group's deadline is
    checked when its next chunk would start."""
    for g, group in enumerate(groups):
        for i in range(0, len(group.tasks), chunk):
            if group.deadline is not None and time.monotonic() >= group.deadline:
                break
            yield g, _Chunk(list(group.tasks[i:i + chunk]), group.cache)


def _predict_here(groups: Sequence[ScoringGroup], job: ScoringJob, version_name: str, workers: int,
                  chunk: int) -> list[list[TaskPrediction]]:
    items = _chunks(groups, chunk)
    out: list[list[TaskPrediction]] = [[] for _ in groups]
    for (g, _), predictions in isolated_map(functools.partial(_score_item, job=job), items, workers=max(1, workers),
                                            crashed=functools.partial(_crashed_item, job=job, version=version_name),
                                            ordered=True, window=3 * max(1, workers)):
        out[g].extend(predictions)
    return out


def predict_tasks_in_processes(tasks: Sequence[Mapping[str, Any]], version: ModelVersion, data_root: Path,
                               workers: int, chunk: int = SCORING_CHUNK, with_image_hash: bool = False,
                               cache: InputCache | None = None) -> list[TaskPrediction]:
    """One :class:`TaskPrediction` per task, in the tasks' order, computed in ``workers`` processes."""
    return predict_groups_in_processes([ScoringGroup(tasks, cache)], version, data_root, workers, chunk,
                                       with_image_hash)[0]


def predict_groups_in_processes(groups: Sequence[ScoringGroup], version: ModelVersion, data_root: Path, workers: int,
                                chunk: int = SCORING_CHUNK, with_image_hash: bool = False) -> list[list[TaskPrediction]]:
    """Each group's predictions, in its tasks' order (for a group with a deadline, of a prefix of its
    tasks); every group in one pass over the same processes (one start-up, every core busy until the
    last chunk)."""
    if not any(g.tasks for g in groups):
        return [[] for _ in groups]
    job = ScoringJob(str(version.path), str(data_root), with_image_hash)
    if not multiprocessing.current_process().daemon:
        return _predict_here(groups, job, version.name, workers, chunk)
    with tempfile.TemporaryDirectory(prefix="mammoflag-scoring-") as tmp:  # mode 0700
        request, answer = Path(tmp) / "request.pickle", Path(tmp) / "answer.pickle"
        with open(request, "wb") as fh:
            sent = [ScoringGroup(list(g.tasks), g.cache, g.deadline) for g in groups]
            pickle.dump((sent, job, version.name, workers, chunk), fh, protocol=pickle.HIGHEST_PROTOCOL)
        proc = subprocess.run([sys.executable, "-m", "ml_backend.scoring", str(request), str(answer)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the scoring process exited with {proc.returncode}: {proc.stderr[-1000:]}")
        with open(answer, "rb") as fh:
            result: list[list[TaskPrediction]] = pickle.load(fh)
    if any(len(r) > len(g.tasks) or (g.deadline is None and len(r) != len(g.tasks))
           for r, g in zip(result, groups)):
        raise RuntimeError("the scoring process answered another number of predictions than tasks were sent")
    return result


@dataclass(frozen=True)
class _WarmJob:
    spec: ModelSpec
    data_root: str
    cache: InputCache


def _warm_chunk(tasks: list[Mapping[str, Any]], job: _WarmJob) -> int:
    return warm_input_cache(tasks, job.spec, Path(job.data_root), job.cache)


def warm_in_processes(tasks: Sequence[Mapping[str, Any]], spec: ModelSpec, data_root: Path, cache: InputCache,
                      workers: int, chunk: int = SCORING_CHUNK) -> int:
    """:func:`ml_backend.predictor.warm_input_cache` over ``workers`` processes (in this process where it
    may not start any: a Celery prefork child); returns the entries made. A chunk that kills its process
    is passed over (its images fail again, and are reported, when a version scores them)."""
    job = _WarmJob(spec, str(data_root), cache)
    if multiprocessing.current_process().daemon or workers <= 1:
        return _warm_chunk(list(tasks), job)
    chunks = [list(tasks[i:i + chunk]) for i in range(0, len(tasks), chunk)]
    return sum(made for _, made in isolated_map(functools.partial(_warm_chunk, job=job), chunks, workers=workers,
                                                crashed=lambda _chunk: 0, ordered=False))


def _main(request: str, answer: str) -> int:
    from mammoflag.pool import _die_with_parent

    _die_with_parent(os.getppid())
    with open(request, "rb") as fh:  # written by predict_tasks_in_processes in a 0700 folder of its own
        groups, job, version_name, workers, chunk = pickle.load(fh)
    result = _predict_here(groups, job, version_name, workers, chunk)
    with open(answer, "wb") as fh:
        pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1], sys.argv[2]))
