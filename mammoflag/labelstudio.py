"""Label Studio access shared by the importer, training, the ML backend and the flagger.

Every call goes through label-studio-sdk. These helpers are idempotent: running them
again finds what the last run made instead of making it twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mammoflag.settings import Settings

log = logging.getLogger(__name__)


class LabelStudioError(RuntimeError):
    pass


def connect(settings: Settings, timeout_s: float = 60):
    """A label-studio-sdk client for the configured server and token."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_token.get(),
                       timeout=timeout_s)


def adjudicator_ids(client, adjudicators: frozenset[str]) -> frozenset[str]:
    """The configured adjudicators (emails or user ids) as the ids annotations carry in ``completed_by``.

    Emails are kept too (older exports carry the user as a dict with an email). An email no
    Label Studio user has is dropped with a warning that does not repeat it.
    """
    if not adjudicators:
        return frozenset()
    wanted = {a.strip().lower() for a in adjudicators if a.strip()}
    ids = {a for a in wanted if a.isdigit()}
    emails = wanted - ids
    if emails:
        found = {str(u.email).lower(): str(u.id) for u in client.users.list() if getattr(u, "email", None)}
        ids |= {found[e] for e in emails if e in found}
        missing = len([e for e in emails if e not in found])
        if missing:
            log.warning("%d configured adjudicator(s) are not Label Studio users", missing)
    return frozenset(ids | emails)


def find_project(client, id_or_title: str | int) -> Any | None:
    """The project with this numeric id, or the one titled so (None when there is none)."""
    text = str(id_or_title)
    if text.isdigit():
        from label_studio_sdk.core.api_error import ApiError

        try:
            return client.projects.get(int(text))
        except ApiError as exc:
            if exc.status_code == 404:
                return None
            raise
    matches = [p for p in client.projects.list(title=text) if p.title == text]
    if len(matches) > 1:
        raise LabelStudioError(f"{len(matches)} projects are titled {text!r}; name one by id")
    return matches[0] if matches else None


def find_or_create_project(client, id_or_title: str | int, label_config: str, **fields: Any):
    """Get or create a project and make its label config (and any ``fields``) what mammoflag says."""
    project = find_project(client, id_or_title)
    if project is None:
        title = str(id_or_title)
        if title.isdigit():
            raise LabelStudioError(f"no Label Studio project with id {title}")
        if len(title) < 3:
            raise LabelStudioError(f"project title {title!r} is too short (Label Studio needs 3+ characters)")
        project = client.projects.create(title=title, label_config=label_config, **fields)
        log.info("created Label Studio project %s (%r)", project.id, title)
        return project
    changes = {k: v for k, v in fields.items() if getattr(project, k, None) != v}
    if _normalized_xml(project.label_config) != _normalized_xml(label_config):
        changes["label_config"] = label_config
    if changes:
        project = client.projects.update(id=project.id, **changes)
        log.info("updated Label Studio project %s: %s", project.id, sorted(changes))
    return project


def ensure_local_storage(client, project_id: int, path: Path, title: str = "mammoflag images") -> Any:
    """A local-files storage on ``path`` for the project.

    Label Studio serves ``/data/local-files/?d=...`` only for files below the path of some
    local storage the user's project owns; tasks are imported directly (never synced from it).
    Label Studio 1.23 refuses a storage on LOCAL_FILES_DOCUMENT_ROOT itself, so ``path`` is a
    folder below the data root (an import DATA_DIR).
    """
    path_s = str(Path(path).resolve())
    for storage in client.import_storage.local.list(project=project_id):
        if storage.path == path_s:
            return storage
    return client.import_storage.local.create(project=project_id, path=path_s, title=title,
                                              use_blob_urls=False, recursive_scan=True)


def _normalized_xml(xml: str | None) -> str:
    return " ".join((xml or "").split())


# Data Manager filter: tasks with at least one annotation, submitted or skipped (cancelled).
ANNOTATED_QUERY = json.dumps({"filters": {"conjunction": "or", "items": [
    {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0},
    {"filter": "filter:tasks:cancelled_annotations", "operator": "greater", "type": "Number", "value": 0},
]}})


def iter_annotated_tasks(client, project_id: int, page_size: int = 500) -> Iterator[dict[str, Any]]:
    """Every task of the project that has an annotation, with its annotations, page by page.

    The filter runs in Label Studio's database, so a project of a million tasks with a few hundred
    labels costs a few hundred rows, not a million. Tasks come as plain dicts, the shape of a JSON
    export, so export files and live projects go through the same readers.
    """
    for task in client.tasks.list(project=project_id, query=ANNOTATED_QUERY, fields="all", page_size=page_size):
        yield _plain(task)


def _plain(obj: Any) -> Any:
    """SDK objects (pydantic models) as plain dicts."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return obj.dict()
    return obj


# -- the labeling pool's calls (ml_backend/pool.py decides; these only talk to Label Studio) --------

TASK_PAGE_SIZE = 1000
DELETE_BATCH = 1000  # task ids per "delete_tasks" action request


@dataclass(frozen=True)
class TaskState:
    """What the labeling pool needs to know about one task of the project."""

    id: int
    key: str  # data.key (<sop_instance_uid>:<frame>); "" when the task has none
    labelled: bool  # any annotation, submitted or skipped: a person's work, never removed
    study: str


def iter_task_states(client, project_id: int, page_size: int = TASK_PAGE_SIZE) -> Iterator[TaskState]:
    """Every task of the project, page by page, as :class:`TaskState`."""
    for task in client.tasks.list(project=project_id, page_size=page_size, fields="task_only",
                                  include="id,data,total_annotations,cancelled_annotations"):
        data = task.data or {}
        yield TaskState(id=int(task.id), key=str(data.get("key") or ""),
                        labelled=bool((task.total_annotations or 0) or (task.cancelled_annotations or 0)),
                        study=str(data.get("study_instance_uid") or ""))


def delete_tasks(client, project_id: int, task_ids: list[int]) -> int:
    """Delete tasks (and with them their predictions) by id, a thousand per request; returns how many were asked."""
    for start in range(0, len(task_ids), DELETE_BATCH):
        chunk = [int(t) for t in task_ids[start:start + DELETE_BATCH]]
        client.actions.create(id="delete_tasks", project=project_id, selected_items={"all": False, "included": chunk})
    return len(task_ids)


def model_versions(client, project_id: int) -> dict[str, int]:
    """``{model_version: prediction count}`` of the project's stored predictions (one database query in Label Studio)."""
    response = client._client_wrapper.httpx_client.request(f"api/projects/{project_id}/model-versions/", method="GET")
    response.raise_for_status()
    return {str(k): int(v) for k, v in (response.json() or {}).items()}


def delete_predictions_of_version(client, project_id: int, version: str) -> int:
    """Delete every prediction of one model version in the project (one request); returns how many.

    Label Studio 1.23's ``DELETE /api/projects/<id>/model-versions/`` deletes the rows in one query
    (no per-task recount). Never call it with the project's own ``model_version``: Label Studio
    would then clear that field.
    """
    response = client._client_wrapper.httpx_client.request(f"api/projects/{project_id}/model-versions/",
                                                           method="DELETE", json={"model_version": version})
    response.raise_for_status()
    return int((response.json() or {}).get("deleted_predictions", 0))
