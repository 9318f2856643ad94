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
from typing import Any, Iterator, Sequence

from celery import shared_task

from mammoflag.inference import OnnxClassifier
from mammoflag.registry import Registry
from mammoflag.settings import Settings
from ml_backend.diversity import RankedItem, diversified_scores, group_ids
from ml_backend.predictor import predict_tasks
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
    created = 0
    for chunk in _batches(payload, UPLOAD_BATCH):
        created += client.projects.import_predictions(project_id, request=list(chunk)).created or 0
    if created != len(payload):
        raise RuntimeError(f"Label Studio stored {created} of {len(payload)} predictions for project {project_id}")
    summary["predicted"] = created
    summary["groups"] = len(set(group_ids(ranked)))

    # A newer version may have become current while we predicted: then leave the switch to its job.
    # (Label Studio refuses a model_version no prediction carries: with nothing to predict, it waits.)
    if registry.current_name() == version_name:
        summary["switched"] = switch_model_version(client, project_id, version_name)
    log.info("repredict project %s with %s: %d task(s) predicted, %d error(s), switched=%s", project_id,
             version_name, summary["predicted"], summary["error_count"], summary["switched"])
    return summary


@shared_task(name="mammoflag.repredict", bind=True, acks_late=True)
def repredict(self, project_id: int, version: str) -> dict[str, Any]:
    """Celery shell around :func:`repredict_project`; settings come from the worker's app."""
    from mammoflag.labelstudio import connect
    from mammoflag.jobs import settings_of

    settings = settings_of(self.app)
    return repredict_project(connect(settings), settings, int(project_id), str(version))
