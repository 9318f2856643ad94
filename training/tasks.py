"""Celery task ``mammoflag.retrain``: retrain a project's model when enough new labels arrived.

Rules (each one a reason a webhook storm or a dying worker cannot corrupt the registry):

- One run per project at a time: a lock in the broker's own store (Redis ``SET NX EX`` when the
  broker is Redis; an ``flock`` on a file under ``MAMMOFLAG_HOME`` with the embedded SQLite broker).
- Bursts coalesce: the webhook sends a retrain only when none is waiting in the queue (a
  "queued" mark the run clears as it starts, before it reads Label Studio); a message arriving
  while a run holds the lock only records "rerun wanted" and returns; when the run ends it sends
  one new retrain, which re-reads every annotation from Label Studio (webhooks are never the
  record of what is new).
- A run starts training only with >= ``retrain_min_new_annotations`` annotations newer than the
  last version of this project, or when forced.
- Idempotent: a version already trained on exactly this data (same fingerprint) is not trained
  again; if the run that made it died before moving ``current``, the retry finishes that step.
- ``acks_late`` + ``reject_on_worker_lost`` (set on the app): a worker killed mid-run leaves its
  message to be delivered again. Everything the run writes goes through ``Registry.staging`` and
  an atomic rename, so nothing half-written is ever a version and the pointer never half-moves.
- After a run that moved ``current``, ``mammoflag.repredict(project_id, version)`` is sent by name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from celery import Task, shared_task

from mammoflag.jobs import Queues, TaskName, run_lock_for, settings_of
from mammoflag.registry import ModelVersion, Registry
from mammoflag.settings import Settings

log = logging.getLogger(__name__)

LABEL_STUDIO_RETRY_S = 60  # Label Studio unreachable: try the run again this much later (5 times)


# -- the run -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrainOutcome:
    status: str  # trained | up_to_date | waiting | coalesced | not_enough_labels
    project_id: int
    version: str | None = None
    became_current: bool = False
    reason: str = ""
    new_annotations: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "project_id": self.project_id, "version": self.version,
                "became_current": self.became_current, "reason": self.reason,
                "new_annotations": self.new_annotations}


def latest_version_for(registry: Registry, project_id: int) -> ModelVersion | None:
    """The newest registered version trained from this Label Studio project (current or candidate)."""
    mine = [v for v in registry.versions() if v.card.data.project_id == project_id]
    return mine[-1] if mine else None


def retrain_project(project_id: int, force: bool, settings: Settings, client, holder: str,
                    send_repredict: Callable[[int, str], None],
                    progress: Callable[[str], None] = lambda stage: None) -> RetrainOutcome:
    """Read all annotations, decide whether to train, train and register. Call with the run lock held."""
    from mammoflag.spec import ModelSpec
    from training.dataset import labelled_set_from_project
    from training.train import NotEnoughLabels, TrainConfig, train_version

    registry = Registry(settings.models_dir)
    spec = ModelSpec.from_label_config(settings.label_config(), input_size=settings.input_size)
    progress("reading annotations")
    labelled = labelled_set_from_project(client, project_id, spec, settings.data_root,
                                         adjudicators=settings.adjudicators)
    last = latest_version_for(registry, project_id)

    if last is not None and last.card.data_fingerprint == labelled.fingerprint:
        finished = _finish_interrupted_promotion(registry, last, send_repredict, project_id)
        return RetrainOutcome("up_to_date", project_id, last.name, finished,
                              "the last version was trained on exactly these labels"
                              + ("; finished moving current to it" if finished else ""), 0)
    last_max_id = last.card.data.max_annotation_id if last else 0
    new = labelled.new_annotations_since(last_max_id)
    if not force and new < settings.retrain_min_new_annotations:
        return RetrainOutcome("waiting", project_id, last.name if last else None, False,
                              f"{new} new annotations since the last version; training starts at "
                              f"{settings.retrain_min_new_annotations}", new)

    progress("training")
    config = TrainConfig.from_settings(settings, defaults={"mode": "auto"})
    try:
        result = train_version(labelled, spec, registry, config, {"project_id": project_id, "run": holder})
    except NotEnoughLabels as exc:
        return RetrainOutcome("not_enough_labels", project_id, last.name if last else None, False, str(exc), new)
    if result.became_current:
        send_repredict(project_id, result.version.name)
    return RetrainOutcome("trained", project_id, result.version.name, result.became_current,
                          result.promotion_reason, new)


def _finish_interrupted_promotion(registry: Registry, version: ModelVersion,
                                  send_repredict: Callable[[int, str], None], project_id: int) -> bool:
    """A run that published and decided 'current' but died before moving the pointer: move it now.

    Only when the pointer still names the version's parent: if anything moved it since, leave it.
    """
    promoted = version.card.promotion.became_current
    if promoted and registry.current_name() == version.card.parent_version != version.name:
        registry.set_current(version.name)
        send_repredict(project_id, version.name)
        return True
    return False


# -- the Celery task -----------------------------------------------------------------------------

class RetrainTask(Task):
    """The time limit comes from the app's settings (read once when the app was built)."""

    acks_late = True
    reject_on_worker_lost = True

    @property
    def time_limit(self) -> int:  # type: ignore[override]
        return settings_of(self.app).retrain_time_limit_s

    @property
    def soft_time_limit(self) -> int:  # type: ignore[override]
        return max(1, settings_of(self.app).retrain_time_limit_s - 30)


def _unreachable() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError)


@shared_task(name=TaskName.RETRAIN.value, bind=True, base=RetrainTask)
def retrain(self, project_id: int, force: bool = False) -> dict[str, Any]:
    settings = settings_of(self.app)
    holder = self.request.id or f"local-{os.getpid()}"
    lock = run_lock_for(settings, project_id)
    # First, before anything is read from Label Studio: an annotation made from now on sends a new
    # message (this run may not see it); one made before is seen by this run.
    lock.clear_queued()
    if not lock.acquire(holder):
        lock.want_rerun(force)
        log.info("retrain of project %s already running: rerun recorded", project_id)
        return RetrainOutcome("coalesced", project_id, reason="another run holds the lock; rerun recorded").as_dict()
    try:
        from mammoflag.labelstudio import connect

        def send_repredict(pid: int, version: str) -> None:
            self.app.send_task(TaskName.REPREDICT.value, args=(pid, version), queue=Queues.PREDICT.value)

        def progress(stage: str) -> None:
            if self.request.id and not self.request.called_directly:
                self.update_state(state="PROGRESS", meta={"stage": stage, "pid": os.getpid()})

        try:
            outcome = retrain_project(project_id, force, settings, connect(settings), holder, send_repredict,
                                      progress)
        except _unreachable() as exc:
            # Label Studio down or restarting: nothing was written; the same run is asked for again later
            log.warning("retrain of project %s: Label Studio unreachable (%s); retrying", project_id,
                        type(exc).__name__)
            raise self.retry(countdown=LABEL_STUDIO_RETRY_S, max_retries=5, exc=exc)
    finally:
        lock.release(holder)
        rerun = lock.take_rerun()
        if rerun:
            self.app.send_task(TaskName.RETRAIN.value, args=(project_id, rerun == "force"),
                               queue=Queues.TRAINING.value)
    log.info("retrain of project %s: %s", project_id, outcome.as_dict())
    return outcome.as_dict()
