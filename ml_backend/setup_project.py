"""Make a Label Studio project ready for active learning with the mammoflag backend (idempotent).

One call leaves the project with: mammoflag's label config; a local-files storage on each folder
below the data root (so ``/data/local-files/?d=`` URLs open); one webhook to the backend's ``/webhook`` with the
secret header, for the annotation and task actions; the ML backend connected with basic auth;
``sampling = "Uncertainty sampling"``; ``model_version`` = the registry's current version; and a
Data Manager tab ordered by prediction score (least certain first).

Label Studio accepts a ``model_version`` only when some prediction (or the backend's title)
carries it. When none does yet, ``setup-project`` enqueues ``mammoflag.repredict`` for the
current version, which uploads the predictions and then switches the project.

About the webhook Label Studio makes by itself: when an ML backend is *created* it registers
``<backend url>/webhook`` for all actions, without headers, unless a webhook with exactly that
URL already exists in the project. We create ours first, so Label Studio skips its own; on a
project connected before, we adopt that webhook and give it our header and action list. Either
way the project ends with exactly one webhook to the backend, and it authenticates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from label_config import LabelConfig
from mammoflag.labelstudio import ensure_local_storage, find_or_create_project
from mammoflag.registry import Registry
from mammoflag.settings import Settings
from ml_backend.app import REPREDICT_TASK, WEBHOOK_ACTIONS, WEBHOOK_SECRET_HEADER, Enqueue

log = logging.getLogger(__name__)

BACKEND_TITLE = "mammoflag"
SCORE_VIEW_TITLE = "Least certain first"
SCORE_ORDERING = ["tasks:predictions_score"]
UNCERTAINTY_SAMPLING = "Uncertainty sampling"
# the model_version of the order before any model (order_cold_start): predictions with no result, whose
# score is the task's place in the cold-start order; the first version's re-prediction switches away from
# it and prune_old_predictions (ml_backend/tasks.py) deletes them a version later
COLD_START_VERSION = "cold-start"


@dataclass(frozen=True)
class ProjectSetup:
    project_id: int
    storage_ids: tuple[int, ...]
    webhook_id: int
    ml_backend_id: int
    view_id: int
    model_version: str | None
    model_version_pending: bool = False  # set by the repredict job once predictions carry the version
    repredict_job: str | None = None


def setup_project(client, settings: Settings, id_or_title: str | int, label_config: LabelConfig,
                  enqueue: Enqueue | None = None) -> ProjectSetup:
    """Create or update the project and everything around it; running it again changes nothing."""
    # show_collab_predictions: an annotator opening a task without a prediction makes Label Studio ask
    # /predict for that one task. evaluate_predictions_automatically stays off: with it, every task
    # *list* call (the Data Manager, training reading annotations) predicts all listed tasks that
    # lack one, synchronously; re-prediction in a worker does that job instead.
    project = find_or_create_project(client, id_or_title, label_config.xml, sampling=UNCERTAINTY_SAMPLING,
                                     show_collab_predictions=True, evaluate_predictions_automatically=False)
    storages = [ensure_local_storage(client, project.id, d) for d in storage_dirs(settings.data_root)]
    webhook = ensure_webhook(client, project.id, settings)  # before the backend: see the module doc
    backend = ensure_ml_backend(client, project.id, settings)
    view = ensure_score_view(client, project.id)
    version = Registry(settings.models_dir).current_name()
    # Connecting a backend can set an empty model_version to the backend's title; set ours last.
    switched, job = version is None or switch_model_version(client, project.id, version), None
    if not switched and enqueue is not None:
        # Label Studio accepts a model_version only once predictions carry it: re-predict, which
        # uploads them and then switches (the same job a new model version runs).
        job = enqueue(REPREDICT_TASK, [project.id, version])
    log.info("project %s ready: backend %s, webhook %s, view %s, model_version %s%s", project.id, backend.id,
             webhook.id, view.id, version, "" if switched else f" pending (repredict job {job})")
    return ProjectSetup(project.id, tuple(s.id for s in storages), webhook.id, backend.id, view.id, version,
                        model_version_pending=not switched, repredict_job=job)


def switch_model_version(client, project_id: int, version: str) -> bool:
    """Point the project at ``version``; False when Label Studio refuses (no prediction carries it yet)."""
    from label_studio_sdk.core.api_error import ApiError

    if client.projects.get(project_id).model_version == version:
        return True
    try:
        client.projects.update(id=project_id, model_version=version)
    except ApiError as exc:
        if exc.status_code == 400:
            return False
        raise
    return True


def storage_dirs(data_root: Path) -> list[Path]:
    """The folders to give the project local-files storages on: each folder directly below the data root.

    Label Studio refuses a storage whose path *is* LOCAL_FILES_DOCUMENT_ROOT (the data root) and
    serves a file only below some storage's path, so each import DATA_DIR gets its own storage.
    """
    if not data_root.is_dir():
        return []
    return sorted(d for d in data_root.iterdir() if d.is_dir() and not d.name.startswith("."))


def backend_webhook_url(settings: Settings) -> str:
    return f"{settings.backend_url}/webhook"


def ensure_webhook(client, project_id: int, settings: Settings) -> Any:
    url = backend_webhook_url(settings)
    wanted = dict(actions=list(WEBHOOK_ACTIONS), headers={WEBHOOK_SECRET_HEADER: settings.webhook_secret.get()},
                  send_payload=True, send_for_all_actions=False, is_active=True)
    mine = [w for w in client.webhooks.list(project=str(project_id)) if w.url == url]
    if not mine:
        return client.webhooks.create(project=project_id, url=url, **wanted)
    first, extra = mine[0], mine[1:]
    for dup in extra:  # two webhooks to one receiver would enqueue every retrain twice
        client.webhooks.delete(dup.id)
    current = dict(actions=sorted(first.actions or []), headers=first.headers or {}, send_payload=first.send_payload,
                   send_for_all_actions=first.send_for_all_actions, is_active=first.is_active)
    if current != {**wanted, "actions": sorted(wanted["actions"])}:
        client.webhooks.update(first.id, url=url, **wanted)
    return first


def ensure_ml_backend(client, project_id: int, settings: Settings) -> Any:
    """The backend connection; Label Studio calls /health and /setup when it is created or updated."""
    wanted = dict(title=BACKEND_TITLE, auth_method="BASIC_AUTH", basic_auth_user=settings.backend_user,
                  basic_auth_pass=settings.backend_password.get(), is_interactive=False, auto_update=True)
    backends = client.ml.list(project=project_id)
    mine = [b for b in backends if b.url.rstrip("/") == settings.backend_url]
    if not mine:
        return client.ml.create(project=project_id, url=settings.backend_url, **wanted)
    # The stored password is write-only in the API: update every time (cheap, and it re-runs /setup).
    # Label Studio 1.23 answers 500 to a PATCH without `project` (its validator calls /setup with none).
    return client.ml.update(mine[0].id, project=project_id, url=settings.backend_url, **wanted)


def ensure_score_view(client, project_id: int) -> Any:
    for view in client.views.list(project=project_id):
        data = view.data or {}
        if data.get("title") == SCORE_VIEW_TITLE:
            if data.get("ordering") != SCORE_ORDERING:
                return client.views.update(str(view.id), project=project_id,
                                           data={**data, "ordering": SCORE_ORDERING})
            return view
    return client.views.create(project=project_id, data={"title": SCORE_VIEW_TITLE, "ordering": SCORE_ORDERING})


# -- the labeling pool (ml_backend/pool.py) ------------------------------------------------------

@dataclass(frozen=True)
class PoolFill:
    project_id: int
    archives: tuple[str, ...]
    unlabeled_before: int
    added: int
    bound: int
    inputs_cached: int = 0  # model inputs of the added tasks made ahead of the first version's round
    cold_start_ordered: int = 0  # unlabeled tasks given the cold-start order (order_cold_start), before any model

    def as_text(self) -> str:
        return (f"pool of project {self.project_id}: archives {list(self.archives)}; {self.unlabeled_before} "
                f"unlabeled tasks, {self.added} added by the stratified cold-start sample (bound {self.bound}), "
                f"{self.inputs_cached} model inputs cached, {self.cold_start_ordered} tasks in the cold-start order")


def ensure_pool(client, settings: Settings, project_id: int, archives: list[Path], chunk_size: int = 500) -> PoolFill:
    """Give the project a labeling pool over ``archives`` and fill it to the bound with a stratified sample.

    Idempotent: archives already registered stay, keys already in the project are never sent
    again, and a pool at its bound gets nothing. Later rounds (after each new current version)
    top the pool up from the archive (``mammoflag.repredict``). The added tasks' model inputs are
    made here, into the pool's input cache (``ml_backend.tasks.input_cache_dir``), for the current
    version's spec or, before any, the settings' one: the round after the first retrain then only
    runs the model on them instead of decoding 2,000 PNGs while annotators wait for the new order.
    """
    from mammoflag.datadir import MANIFEST_FILE, read_manifest, task_data_for_row
    from mammoflag.labelstudio import iter_task_states
    from ml_backend.pool import plan_cold_start, register_archives

    state = register_archives(settings.data_root, project_id, archives)
    tasks = list(iter_task_states(client, project_id))
    in_project = {t.key for t in tasks if t.key}
    unlabeled = sum(1 for t in tasks if not t.labelled)
    want = settings.pool_size - unlabeled

    def rows():
        for archive in state.archives:
            yield from read_manifest(settings.data_root / archive / MANIFEST_FILE)

    keys = set(plan_cold_start(rows(), want, exclude=in_project)) if want > 0 else set()
    batch: list[dict] = []
    sent: list[dict] = []  # at most the pool bound
    for archive in state.archives:
        for row in read_manifest(settings.data_root / archive / MANIFEST_FILE):
            if row["key"] in keys:
                keys.discard(row["key"])
                batch.append({"data": task_data_for_row(row, settings.data_root / archive, settings.data_root)})
                if len(batch) >= chunk_size:
                    client.projects.import_tasks(project_id, request=batch)
                    sent += batch
                    batch = []
    if batch:
        client.projects.import_tasks(project_id, request=batch)
        sent += batch
    cached = _warm_pool_inputs(settings, project_id, sent)
    ordered = order_cold_start(client, settings, project_id, refresh=bool(sent))
    log.info("pool of project %s: %d unlabeled, %d added (bound %d), %d model inputs cached, %d in the cold-start "
             "order", project_id, unlabeled, len(sent), settings.pool_size, cached, ordered)
    return PoolFill(project_id, state.archives, unlabeled, len(sent), settings.pool_size, cached, ordered)


def order_cold_start(client, settings: Settings, project_id: int, refresh: bool = False) -> int:
    """Before any model, serve the project's unlabeled tasks in the typical/diverse order of
    ``ml_backend.typical`` instead of Label Studio's uniform draw; returns how many tasks it ordered.

    Label Studio's uncertainty sampling serves the lowest prediction score among predictions of the
    project's ``model_version`` and falls back to a random task when none carries it. So the order is
    uploaded as predictions of :data:`COLD_START_VERSION` with an empty result (annotators see no
    prelabel) and score = place / tasks, and the project is pointed at that version. Nothing is done once a
    version is current (its own re-prediction orders the queue), nor when the order exists and ``refresh``
    is False; a refresh (the pool took new tasks) deletes the old order first: Label Studio then clears
    the project's ``model_version`` until the new one is uploaded, and serves at random meanwhile. An
    image that cannot be read goes last (its error is logged; the first model's round reports it too).
    """
    import numpy as np

    from mammoflag.labelstudio import TASK_PAGE_SIZE, delete_predictions_of_version, model_versions
    from mammoflag.preprocess import letterbox
    from mammoflag.spec import ModelSpec
    from ml_backend.predictor import InputCache, TaskImageError, read_task_image, task_image_path
    from ml_backend.tasks import input_cache_dir, upload_predictions
    from ml_backend.typical import appearance, order_scores, typical_diverse_order

    if Registry(settings.models_dir).current_name() is not None:
        return 0
    if COLD_START_VERSION in model_versions(client, project_id):
        if not refresh:
            return 0
        delete_predictions_of_version(client, project_id, COLD_START_VERSION)
    tasks = [{"id": int(t.id), "data": t.data or {}} for t in client.tasks.list(
                 project=project_id, page_size=TASK_PAGE_SIZE, fields="task_only",
                 include="id,data,total_annotations,cancelled_annotations")
             if not (t.total_annotations or t.cancelled_annotations)]
    if not tasks:
        return 0
    spec = ModelSpec.from_label_config(settings.label_config(), input_size=settings.input_size)
    cache = InputCache.for_spec(input_cache_dir(settings.data_root, project_id), spec)
    readable, embeddings = [], []
    for task in tasks:
        try:
            path = task_image_path(task, spec.image_key, settings.data_root)
            cached = cache.get(path)  # ensure_pool has just made the pool's inputs: channel 0 is the area plane
            plane = cached[0][0] if cached is not None else letterbox(
                read_task_image(task, spec.image_key, path), spec.input_size)
            embeddings.append(appearance(plane))
            readable.append(task)
        except (TaskImageError, ValueError) as exc:
            log.warning("cold-start order: %s; served last", exc)
    placed = typical_diverse_order(np.stack(embeddings)) if embeddings else []
    order = [readable[i]["id"] for i in placed]
    order += sorted({t["id"] for t in tasks} - set(order))
    payload = [{"task": task_id, "result": [], "score": score, "model_version": COLD_START_VERSION}
               for task_id, score in zip(order, order_scores(range(len(order)), len(order)))]
    created = upload_predictions(client, project_id, payload)
    if not switch_model_version(client, project_id, COLD_START_VERSION):
        raise RuntimeError(f"Label Studio refused model_version {COLD_START_VERSION!r} for project {project_id}")
    return created


def order_unpooled_cold_start(client, settings: Settings, project_id: int) -> str:
    """``setup-project`` without ``--archive``: the cold-start order (:func:`order_cold_start`) over every
    unlabeled task of the project, while no version is current and the project holds at most
    ``MAMMOFLAG_POOL_SIZE`` unlabeled tasks; returns a line for the user ("" when there is nothing to say).

    Without a pool nothing caches the model inputs, so the order reads every image: a larger project is
    what ``--archive``'s pool is for (and uploading a prediction per task slows as Label Studio's table
    grows). Tasks imported after the order are placed by running ``setup-project`` again: the order is
    rebuilt when the project holds more tasks than it placed."""
    from mammoflag.labelstudio import model_versions

    if Registry(settings.models_dir).current_name() is not None:
        return ""
    project = client.projects.get(project_id)
    total = int(project.task_number or 0)
    unlabeled = total - int(project.num_tasks_with_annotations or 0)
    if unlabeled <= 0:
        return ""
    if unlabeled > settings.pool_size:
        return (f"{unlabeled} unlabeled tasks, more than MAMMOFLAG_POOL_SIZE={settings.pool_size}: the first round "
                f"is Label Studio's random draw; setup-project --archive DATA_DIR gives a bounded pool its "
                f"typical/diverse first round")
    placed = model_versions(client, project_id).get(COLD_START_VERSION, 0)
    ordered = order_cold_start(client, settings, project_id, refresh=0 < placed < total)
    if ordered:
        return f"{ordered} tasks in the cold-start order (typical/diverse, before any model)"
    return f"{unlabeled} unlabeled tasks already in the cold-start order"


def _warm_pool_inputs(settings: Settings, project_id: int, tasks: list[dict]) -> int:
    from mammoflag.spec import ModelSpec
    from ml_backend.predictor import InputCache
    from ml_backend.scoring import scoring_workers, warm_in_processes
    from ml_backend.tasks import input_cache_dir

    if not tasks:
        return 0
    current = Registry(settings.models_dir).current()
    spec = current.spec if current is not None else ModelSpec.from_label_config(settings.label_config(),
                                                                                 input_size=settings.input_size)
    cache = InputCache.for_spec(input_cache_dir(settings.data_root, project_id), spec)
    return warm_in_processes(tasks, spec, settings.data_root, cache, scoring_workers(settings.pool_workers))
