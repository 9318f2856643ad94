"""Celery task ``mammoflag.repredict``: re-score the unlabeled tasks with a new version, then switch.

Order matters for active learning: predictions tagged with the new version are uploaded first
and only then does the project's ``model_version`` move to it. Label Studio's uncertainty
sampling only counts predictions whose ``model_version`` equals the project's, so annotators
never see a half-scored queue: until the switch they get the old version's order, after it the
new version's, and the next task is always the one the newest model is least sure of (mixed
with :mod:`ml_backend.diversity` so parallel annotators do not get near-duplicates).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from celery import shared_task

from mammoflag.inference import OnnxClassifier
from mammoflag.registry import ModelVersion, Registry
from mammoflag.settings import Settings
from ml_backend.diversity import RankedItem, diversified_scores, group_ids
from ml_backend.pool import (Candidate, PoolState, PoolTask, TopUpPlan, Window, load_state, plan_top_up, read_window,
                             save_state)
from ml_backend.predictor import InputCache, TaskPrediction, predict_tasks
from ml_backend.scoring import ScoringGroup, predict_groups_in_processes, scoring_workers
from ml_backend.setup_project import switch_model_version

log = logging.getLogger(__name__)

UPLOAD_BATCH = 500
MAX_ERRORS_IN_RESULT = 100  # the Celery result keeps the first ones; the worker log has them all

# Data Manager filters: tasks nobody has annotated yet (cancelled/skipped ones count as annotated).
UNLABELED_FILTERS = [
    {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
    {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
]


def _unlabeled_query(version_name: str, predicted: bool) -> str:
    """Unlabeled tasks that have (or lack) a prediction of ``version_name``.

    Label Studio evaluates the version filter in the database (``predictions__model_version``,
    one row per prediction), not on the comma-joined list it shows, which it cuts at 500
    characters. The value must be a list: a plain string would be matched character by character.
    """
    version_filter = {"filter": "filter:tasks:predictions_model_versions",
                      "operator": "contains" if predicted else "not_contains", "type": "List",
                      "value": [version_name]}
    return json.dumps({"filters": {"conjunction": "and", "items": [*UNLABELED_FILTERS, version_filter]}})


def unlabeled_tasks(client, project_id: int, version_name: str, page_size: int = 500) -> Iterator[dict[str, Any]]:
    """``{"id", "data"}`` of every task without annotations and without a ``version_name`` prediction."""
    for task in client.tasks.list(project=project_id, query=_unlabeled_query(version_name, predicted=False),
                                  include="id,data", page_size=page_size):
        yield {"id": task.id, "data": dict(task.data or {})}


def count_unlabeled_predicted(client, project_id: int, version_name: str) -> int:
    """How many unlabeled tasks already have a ``version_name`` prediction (for the run's summary)."""
    return sum(1 for _ in client.tasks.list(project=project_id, query=_unlabeled_query(version_name, predicted=True),
                                            include="id", page_size=1000))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def upload_predictions(client, project_id: int, payload: Sequence[Mapping[str, Any]]) -> int:
    """Import predictions ``UPLOAD_BATCH`` per request; returns how many Label Studio stored (all of them,
    or RuntimeError)."""
    created = 0
    for chunk in _batches(payload, UPLOAD_BATCH):
        created += client.projects.import_predictions(project_id, request=list(chunk)).created or 0
    if created != len(payload):
        raise RuntimeError(f"Label Studio stored {created} of {len(payload)} predictions for project {project_id}")
    return created


def repredict_project(client, settings: Settings, project_id: int, version_name: str) -> dict[str, Any]:
    """Predict the project's unlabeled tasks with ``version_name``, upload, then switch the project to it.

    A version that is no longer current (a newer retrain finished first) is skipped: the
    project must never move back to an older model.
    """
    registry = Registry(settings.models_dir)
    summary: dict[str, Any] = {"project_id": project_id, "version": version_name, "tasks": 0, "predicted": 0,
                               "error_count": 0, "errors": [], "switched": False}
    if registry.current_name() != version_name:
        summary["skipped"] = f"{version_name} is not the current version ({registry.current_name()})"
        log.info("repredict project %s: %s", project_id, summary["skipped"])
        return summary
    version = registry.get(version_name)
    version.spec.check_compatible(settings.label_config())
    state = load_state(settings.data_root, project_id)
    if state is not None:  # a pooled project: only the pool is predicted, the archive tops it up
        summary.update(refresh_pool(client, settings, project_id, version, state))
        return summary
    model = OnnxClassifier(version)  # once for this whole run

    # New tasks (TASKS_CREATED) re-run this job for the version already served: predict only the
    # tasks this version has not seen. Diversity ranks within one run; earlier tasks keep their scores.
    tasks = list(unlabeled_tasks(client, project_id, version_name))
    summary["tasks"] = len(tasks)
    summary["already_predicted"] = count_unlabeled_predicted(client, project_id, version_name)
    predictions = predict_tasks(tasks, model, settings.data_root, with_image_hash=True)  # batched inside
    good = [(t, p) for t, p in zip(tasks, predictions) if p.error is None]
    errors = [p.error for p in predictions if p.error is not None]
    for err in errors:
        log.warning("repredict: %s", err)
    summary["error_count"] = len(errors)  # every task is accounted for: predicted, already done, or here
    summary["errors"] = errors[:MAX_ERRORS_IN_RESULT]

    ranked = [RankedItem(confidence=p.score or 0.0, study=t["data"].get("study_instance_uid") or None,
                         image_hash=p.image_hash) for t, p in good]
    scores = diversified_scores(ranked)
    payload = [{"task": t["id"], "result": p.result, "score": s, "model_version": version_name}
               for (t, p), s in zip(good, scores)]
    created = upload_predictions(client, project_id, payload)
    summary["predicted"] = created
    summary["groups"] = len(set(group_ids(ranked)))

    # A newer version may have become current while we predicted: then leave the switch to its job.
    # (Label Studio refuses a model_version no prediction carries: with nothing to predict, it waits.)
    if registry.current_name() == version_name:
        summary["switched"] = switch_model_version(client, project_id, version_name)
    log.info("repredict project %s with %s: %d task(s) predicted, %d error(s), switched=%s", project_id,
             version_name, summary["predicted"], summary["error_count"], summary["switched"])
    return summary


KEEP_VERSIONS = 2  # predictions of the project's current and previous version stay; older ones are deleted


def refresh_pool(client, settings: Settings, project_id: int, version: ModelVersion, state: PoolState
                 ) -> dict[str, Any]:
    """One round for a pooled project (ml_backend/pool.py): predict the pool, top it up from the archive, switch,
    delete old versions' predictions.

    The first run for a version tops up (scores the next archive window, swaps stale tasks for
    better candidates); later runs for the same version (``TASKS_CREATED``) only predict tasks that
    lack this version's prediction. Run under the project's "pool" lock (see :func:`repredict`).
    Killed midway, a rerun converges: tasks added are in the project (the window skips them),
    tasks removed are gone, tasks predicted are not predicted again, and the state file (cursor,
    version topped up) is written only at the end.
    """
    from mammoflag.datadir import task_data_for_row
    from mammoflag.labelstudio import delete_tasks, iter_task_states

    version_name = version.name
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    tasks = list(iter_task_states(client, project_id))
    to_predict = list(unlabeled_tasks(client, project_id, version_name))
    timings["list_s"] = time.monotonic() - t0

    topping_up = state.topped_up_version != version_name
    window = Window([], [], state.cursor, state.cursor, 0)
    plan = TopUpPlan((), ())
    cand_tasks: list[dict[str, Any]] = []
    if topping_up:
        t = time.monotonic()
        window = read_window(settings.data_root, state, settings.pool_window, {s.key for s in tasks if s.key})
        cand_tasks = [{"data": task_data_for_row(row, settings.data_root / archive, settings.data_root)}
                      for archive, row in window.rows]
        timings["read_window_s"] = time.monotonic() - t
    # The pool and the window in one pass over the scoring processes (one start-up, every core busy).
    # Pool tasks are predicted by every version: their model inputs are cached between rounds (the
    # cold start made those of the first pool; the window's go in too, for the candidates that join). The
    # whole pool is always predicted; window chunks stop starting once the round's time budget is
    # spent (a first round, with nothing cached, or a slow machine), and the cursor then moves only
    # past the window rows scored, which lead the next round's window.
    t = time.monotonic()
    cache = InputCache.for_spec(input_cache_dir(settings.data_root, project_id), version.spec)
    deadline = t0 + settings.pool_round_s if settings.pool_round_s > 0 else None
    pool_preds, cand_preds = predict_groups_in_processes(
        [ScoringGroup(to_predict, cache), ScoringGroup(cand_tasks, cache, deadline)], version, settings.data_root,
        scoring_workers(settings.pool_workers), with_image_hash=True)
    timings["score_s"] = time.monotonic() - t
    scored = len(cand_preds)
    cursor, read = window.cut(scored)
    by_id = {task["id"]: (task, pred) for task, pred in zip(to_predict, pool_preds)}
    errors = [p.error for p in pool_preds if p.error is not None]

    cand_by_key: dict[str, tuple[dict[str, Any], TaskPrediction]] = {}
    if topping_up:
        candidates = []
        for task, pred in zip(cand_tasks, cand_preds):
            if pred.error is None and pred.score is not None:
                key = task["data"]["key"]
                cand_by_key[key] = (task, pred)
                candidates.append(Candidate(key, pred.score, task["data"].get("study_instance_uid") or "",
                                            pred.image_hash))
        pool = [PoolTask(s.id, s.key, s.labelled,
                         by_id[s.id][1].score if s.id in by_id and by_id[s.id][1].error is None else None,
                         s.study, removable=s.id in by_id) for s in tasks]
        plan = plan_top_up(pool, candidates, settings.pool_size)

    removed = set(plan.remove)
    kept = [(task, pred) for task, pred in by_id.values() if pred.error is None and task["id"] not in removed]
    added = [cand_by_key[k] for k in plan.add]
    both = kept + added
    ranked = [RankedItem(confidence=p.score or 0.0, study=task["data"].get("study_instance_uid") or None,
                         image_hash=p.image_hash) for task, p in both]
    scores = diversified_scores(ranked)
    t = time.monotonic()
    payload = [{"task": task["id"], "result": p.result, "score": sc, "model_version": version_name}
               for (task, p), sc in zip(kept, scores[:len(kept)])]
    created = upload_predictions(client, project_id, payload)
    timings["upload_predictions_s"] = time.monotonic() - t
    if plan.remove:
        delete_tasks(client, project_id, list(plan.remove))
    timings["upload_delete_s"] = time.monotonic() - t - timings["upload_predictions_s"]
    new_tasks = [{"data": task["data"], "predictions": [{"result": p.result, "score": sc,
                                                         "model_version": version_name}]}
                 for (task, p), sc in zip(added, scores[len(kept):])]
    for chunk in _batches(new_tasks, UPLOAD_BATCH):
        client.projects.import_tasks(project_id, request=list(chunk))
    timings["upload_s"] = time.monotonic() - t

    switched = False
    registry = Registry(settings.models_dir)
    if registry.current_name() == version_name:
        switched = switch_model_version(client, project_id, version_name)
    timings["to_switch_s"] = time.monotonic() - t0  # annotators get the new version's order from here on
    t = time.monotonic()
    pruned = prune_old_predictions(client, project_id, version_name) if switched else {}
    timings["prune_s"] = time.monotonic() - t
    if topping_up:
        save_state(settings.data_root, replace(state, cursor=cursor, topped_up_version=version_name,
                                               scored_total=state.scored_total + read))
        # the cache keeps the inputs of the pool as it now is: the tasks that stay and those added
        cache.keep([path for task, _ in kept + added if (path := _image_path(task, version, settings)) is not None])
    timings["total_s"] = time.monotonic() - t0
    unlabeled_after = sum(1 for s in tasks if not s.labelled) - len(removed) + len(added)
    log.info("pool of project %s with %s: %d predicted, %d scored from the archive, +%d/-%d tasks, %d unlabeled, "
             "switched=%s, pruned %s", project_id, version_name, created, read, len(added), len(removed),
             unlabeled_after, switched, pruned)
    return {"tasks": len(to_predict), "predicted": created + len(added), "error_count": len(errors),
            "errors": errors[:MAX_ERRORS_IN_RESULT], "switched": switched, "groups": len(set(group_ids(ranked))),
            "pool": {"topped_up": topping_up, "scored": scored, "window": len(cand_tasks), "read": read,
                     "added": len(added), "removed": len(removed), "unlabeled": unlabeled_after, "labelled": sum(1 for s in tasks if s.labelled),
                     "cursor": cursor.to_json(), "pruned": pruned},
            "timings": {k: round(v, 3) for k, v in timings.items()}}


def _image_path(task: dict[str, Any], version: ModelVersion, settings: Settings) -> Path | None:
    from ml_backend.predictor import TaskImageError, task_image_path

    try:
        return task_image_path(task, version.spec.image_key, settings.data_root)
    except TaskImageError:
        return None


def input_cache_dir(data_root: Path, project_id: int) -> Path:
    """Where a pooled project's model-input cache lives: beside its state file, on storage every worker sees."""
    from mammoflag.poolstate import POOL_STATE_DIR

    return data_root / POOL_STATE_DIR / "inputs" / f"project-{int(project_id)}"


def prune_old_predictions(client, project_id: int, current: str, keep: int = KEEP_VERSIONS) -> dict[str, int]:
    """Delete the predictions of every version but ``current`` and the one before it (newest first by
    Label Studio's latest prediction time); ``{version: rows deleted}``."""
    from mammoflag.labelstudio import delete_predictions_of_version, model_versions

    versions = [v for v in model_versions(client, project_id) if v != current]  # newest first
    deleted = {}
    for old in versions[keep - 1:]:
        deleted[old] = delete_predictions_of_version(client, project_id, old)
    return deleted


@shared_task(name="mammoflag.repredict", bind=True, acks_late=True)
def repredict(self, project_id: int, version: str) -> dict[str, Any]:
    """Celery shell around :func:`repredict_project`; settings come from the worker's app.

    One run per project at a time (the project's "pool" lock): a message arriving meanwhile
    records a rerun, sent for the then-current version when the run ends.
    """
    from mammoflag.jobs import run_lock_for, settings_of
    from mammoflag.labelstudio import connect

    settings = settings_of(self.app)
    lock = run_lock_for(settings, int(project_id), kind="pool")
    holder = self.request.id or f"local-{os.getpid()}"
    if not lock.acquire(holder):
        lock.want_rerun(False)
        return {"project_id": project_id, "version": version, "status": "coalesced", "switched": False,
                "skipped": "another re-prediction of this project is running; rerun recorded"}
    try:
        return repredict_project(connect(settings), settings, int(project_id), str(version))
    finally:
        lock.release(holder)
        _send_recorded_rerun(self.app, settings, lock, int(project_id))


def _send_recorded_rerun(app, settings: Settings, lock, project_id: int) -> None:
    """A re-prediction that arrived while the lock was held (it recorded a rerun): send it for the current version."""
    from mammoflag.jobs import Queues, TaskName

    if lock.take_rerun():
        current = Registry(settings.models_dir).current_name()
        if current:
            app.send_task(TaskName.REPREDICT.value, args=(project_id, current), queue=Queues.PREDICT.value)


FILL_RETRY_S = 15  # a fill waits this long when a pool round of the project holds its lock
FILL_MAX_RETRIES = 240  # an hour of waiting; a round is bounded (~1 min), so this is a stuck lock


@shared_task(name="mammoflag.fill_pool", bind=True, acks_late=True, max_retries=FILL_MAX_RETRIES)
def fill_pool(self, project_id: int) -> dict[str, Any]:
    """The pool's cold start for a pooled project, after ``mammoflag import --project`` added an archive:
    free pool slots get a stratified sample of every registered archive (``setup_project.ensure_pool``,
    idempotent). Under the project's "pool" lock, so it never races a top-up round; waits while one runs."""
    from dataclasses import asdict

    from mammoflag.jobs import run_lock_for, settings_of
    from mammoflag.labelstudio import connect
    from ml_backend.setup_project import ensure_pool

    settings = settings_of(self.app)
    if load_state(settings.data_root, int(project_id)) is None:
        return {"project_id": project_id, "status": "no pool", "added": 0}
    lock = run_lock_for(settings, int(project_id), kind="pool")
    holder = self.request.id or f"local-{os.getpid()}"
    if not lock.acquire(holder):
        raise self.retry(countdown=FILL_RETRY_S)
    try:
        fill = ensure_pool(connect(settings), settings, int(project_id), [])
    finally:
        lock.release(holder)
        _send_recorded_rerun(self.app, settings, lock, int(project_id))
    return {**asdict(fill), "archives": list(fill.archives), "status": "filled"}
