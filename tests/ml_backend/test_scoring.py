"""Scoring a pool round in processes (ml_backend/scoring.py) and the model-input cache (InputCache).

Processes give the same predictions as one process, in the tasks' order, with a bad task failing
alone; the cache's entries give the same predictions again, a rewritten image misses, and keep()
leaves only the entries asked for. In a daemonic process (a Celery prefork child) the same work
runs in a child interpreter.
"""

from __future__ import annotations

import os
import time

import billiard

from factories import tiny_model_version
from mammoflag.inference import OnnxClassifier
from mammoflag.paths import task_url_for
from ml_backend.predictor import InputCache, predict_tasks, task_image_path
from ml_backend.scoring import (ScoringGroup, predict_groups_in_processes, predict_tasks_in_processes,
                                warm_in_processes)
from mlb_helpers import model_spec, write_display


def _tasks(data_root, n: int) -> list[dict]:
    tasks = []
    for i in range(n):
        png = write_display(data_root / "scoring" / f"{i}.png", bright=20 + (i * 37) % 236, seed=i)
        tasks.append({"id": i + 1, "data": {"image": task_url_for(png, data_root), "key": f"1.2.{i}:0"}})
    tasks.append({"id": 999, "data": {"image": "/data/local-files/?d=scoring/missing.png"}})
    return tasks


def _comparable(predictions) -> list[tuple]:
    return [(p.task_id, p.score, p.error, p.image_hash, tuple(sorted((p.probabilities or {}).items())))
            for p in predictions]


def test_processes_score_like_one_process_and_the_cache_changes_nothing(tmp_path):
    data_root = tmp_path / "data"
    version = tiny_model_version(tmp_path / "models", model_spec())
    tasks = _tasks(data_root, 41)
    here = predict_tasks(tasks, OnnxClassifier(version), data_root, with_image_hash=True)
    assert here[-1].error and "does not exist" in here[-1].error and all(p.error is None for p in here[:-1])

    cache = InputCache.for_spec(tmp_path / "cache", version.spec)
    pool, window = predict_groups_in_processes([ScoringGroup(tasks[:20], cache), ScoringGroup(tasks[20:])], version,
                                               data_root, workers=2, chunk=8, with_image_hash=True)
    assert _comparable(pool + window) == _comparable(here)
    assert len(list(cache.root.glob("*.npz"))) == 20  # the cached group only

    again = predict_tasks_in_processes(tasks[:20], version, data_root, workers=2, chunk=8, with_image_hash=True,
                                       cache=cache)
    assert _comparable(again) == _comparable(here[:20])  # from the cache entries

    # a rewritten image misses (its size or mtime changed) and is cached anew
    path = task_image_path(tasks[0], version.spec.image_key, data_root)
    write_display(path, bright=250, seed=77)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert cache.get(path) is None
    fresh = predict_tasks([tasks[0]], OnnxClassifier(version), data_root, with_image_hash=True, cache=cache)
    assert cache.get(path) is not None and fresh[0].score != here[0].score

    kept = [task_image_path(t, version.spec.image_key, data_root) for t in tasks[:5]]
    assert cache.keep(kept) == 15 and len(list(cache.root.glob("*.npz"))) == 5


def test_a_group_past_its_deadline_starts_no_more_chunks(tmp_path):
    """The window of a pool round stops at the round's time budget: chunks of a group whose deadline has
    passed are not started (its predictions are those of a prefix), the group before it is scored whole."""
    data_root = tmp_path / "data"
    version = tiny_model_version(tmp_path / "models", model_spec())
    tasks = _tasks(data_root, 24)[:24]
    here = _comparable(predict_tasks(tasks, OnnxClassifier(version), data_root, with_image_hash=True))
    pool, window = predict_groups_in_processes(
        [ScoringGroup(tasks[:8]), ScoringGroup(tasks[8:], deadline=time.monotonic() - 1)], version, data_root,
        workers=2, chunk=4, with_image_hash=True)
    assert _comparable(pool) == here[:8] and window == []
    # a deadline far off: every chunk, the same predictions
    pool, window = predict_groups_in_processes(
        [ScoringGroup(tasks[:8]), ScoringGroup(tasks[8:], deadline=time.monotonic() + 600)], version, data_root,
        workers=2, chunk=4, with_image_hash=True)
    assert _comparable(pool + window) == here
    # a deadline that passes while the group is being scored (one task per chunk, one process: a few
    # ms each, so 2,400 take several seconds): a prefix, at least the chunks started at once, not all
    many = tasks * 100
    _, window = predict_groups_in_processes(
        [ScoringGroup([]), ScoringGroup(many, deadline=time.monotonic() + 1.0)], version, data_root, workers=1,
        chunk=1, with_image_hash=True)
    assert 3 <= len(window) < len(many) and _comparable(window) == (here * 100)[:len(window)]


def test_a_warmed_cache_gives_the_same_predictions(tmp_path, monkeypatch):
    """A new pool's model inputs made ahead of any model (ml_backend.setup_project.ensure_pool): one entry per
    usable image, in processes or here, and predicting from them changes nothing."""
    data_root = tmp_path / "data"
    version = tiny_model_version(tmp_path / "models", model_spec())
    tasks = _tasks(data_root, 12)
    here = _comparable(predict_tasks(tasks, OnnxClassifier(version), data_root, with_image_hash=True))
    cache = InputCache.for_spec(tmp_path / "cache", version.spec)
    assert warm_in_processes(tasks[:6], version.spec, data_root, cache, workers=2, chunk=2) == 6
    assert warm_in_processes(tasks, version.spec, data_root, cache, workers=1) == 6  # the rest; the missing one passed over
    assert len(list(cache.root.glob("*.npz"))) == 12
    made: list = []
    monkeypatch.setattr(InputCache, "put", lambda self, *a: made.append(a))  # nothing is made again
    again = predict_tasks(tasks, OnnxClassifier(version), data_root, with_image_hash=True, cache=cache)
    assert _comparable(again) == here and made == []


def _score_in_daemon(args) -> list[tuple]:
    version, data_root, tasks = args
    return _comparable(predict_tasks_in_processes(tasks, version, data_root, workers=2, with_image_hash=True))


def test_a_daemonic_process_scores_through_a_child_interpreter(tmp_path):
    data_root = tmp_path / "data"
    version = tiny_model_version(tmp_path / "models", model_spec())
    tasks = _tasks(data_root, 10)
    here = predict_tasks(tasks, OnnxClassifier(version), data_root, with_image_hash=True)
    with billiard.Pool(1) as pool:  # what a Celery prefork worker runs its tasks in: daemonic
        [answer] = pool.map(_score_in_daemon, [(version, data_root, tasks)])
    assert answer == _comparable(here)
