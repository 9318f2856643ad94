"""Double reading and adjudication in Label Studio Community: overlap, and a tab of disputed tasks.

- **Overlap** (``setup-project --overlap FRACTION --readers N``): Label Studio's
  ``maximum_annotations = N`` and ``overlap_cohort_percentage = FRACTION x 100``: that share of
  the tasks is served to N different readers, the rest to one. Label Studio re-deals the cohort
  itself when tasks are imported or the settings change (``Project._rearrange_overlap_cohort``).
- **What readers see**: readers label in the stream (``/projects/<id>/data?labeling=1``, i.e.
  ``/api/projects/<id>/next``), which returns only the reader's own annotations of a task, so a
  second reader does not see the first one's answer while labelling. Community has no roles:
  every member of the organization can still open the Data Manager, see the annotation columns
  and open any task with all its annotations. Hiding those is an Enterprise feature; mammoflag
  cannot enforce it, only not show it in the stream.
- **Adjudication**: disputed tasks (``mammoflag.labels.resolve``: readers disagree and no
  adjudicator answered) carry ``data.mammoflag_review = "disputed"`` and a Data Manager tab
  lists exactly those. An adjudicator (``MAMMOFLAG_ADJUDICATORS``) opens a task there and
  answers; the mark is refreshed for that task as soon as Label Studio's annotation webhook
  reaches the backend (``ANNOTATION_CREATED``/``ANNOTATIONS_CREATED``/``ANNOTATION_UPDATED``:
  :func:`refresh_tasks`, only the tasks the webhook names, after the webhook is answered), and for
  every annotated task on each ``setup-project`` run (:func:`mark_disputed`). Deleting an annotation
  (``ANNOTATIONS_DELETED`` names annotation ids only, not their tasks) is caught by the next
  annotation of that task or the next ``setup-project``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from mammoflag.labels import LabelStatus, resolve
from mammoflag.labelstudio import adjudicator_ids, iter_annotated_tasks
from mammoflag.spec import ModelSpec

log = logging.getLogger(__name__)

REVIEW_FIELD = "mammoflag_review"
DISPUTED = "disputed"
DISPUTED_VIEW_TITLE = "Disputed: for the adjudicator"
DISPUTED_FILTERS = {"conjunction": "and", "items": [
    {"filter": f"filter:tasks:data.{REVIEW_FIELD}", "operator": "equal", "type": "String", "value": DISPUTED}]}


@dataclass(frozen=True)
class Overlap:
    """``fraction`` of the tasks is read by ``readers`` different readers, the rest once."""

    fraction: float
    readers: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"--overlap must be between 0 and 1, not {self.fraction}")
        if self.readers < 1:
            raise ValueError(f"--readers must be at least 1, not {self.readers}")

    @property
    def percentage(self) -> int:
        return int(round(self.fraction * 100))


@dataclass(frozen=True)
class ReviewSetup:
    project_id: int
    maximum_annotations: int
    overlap_percentage: int
    disputed_view_id: int
    disputed: int  # tasks disputed now
    marked: int  # marks added by this run
    cleared: int  # marks removed (adjudicated, or readers now agree)

    def as_text(self) -> str:
        share = (f"{self.overlap_percentage}% of tasks read by {self.maximum_annotations} readers"
                 if self.maximum_annotations > 1 and self.overlap_percentage else "every task read once")
        return (f"overlap: {share}; disputed tab {self.disputed_view_id}: {self.disputed} disputed tasks "
                f"(+{self.marked} marked, -{self.cleared} cleared)")


def ensure_overlap(client, project_id: int, overlap: Overlap) -> Any:
    readers = overlap.readers if overlap.percentage else 1
    percentage = overlap.percentage if readers > 1 else 100
    project = client.projects.get(project_id)
    if (project.maximum_annotations, project.overlap_cohort_percentage) != (readers, percentage):
        project = client.projects.update(id=project_id, maximum_annotations=readers,
                                         overlap_cohort_percentage=percentage)
        log.info("project %s: %d%% of tasks read by %d readers", project_id, percentage, readers)
    return project


def ensure_disputed_view(client, project_id: int) -> Any:
    for view in client.views.list(project=project_id):
        data = view.data or {}
        if data.get("title") == DISPUTED_VIEW_TITLE:
            if data.get("filters") != DISPUTED_FILTERS:
                return client.views.update(str(view.id), project=project_id, data={**data, "filters": DISPUTED_FILTERS})
            return view
    return client.views.create(project=project_id, data={"title": DISPUTED_VIEW_TITLE, "filters": DISPUTED_FILTERS})


def _refresh(client, task_id: int, data: Mapping[str, Any], annotations: Sequence[Mapping[str, Any]], spec: ModelSpec,
             adjudicators: frozenset[str]) -> tuple[bool, int, int]:
    """Set or clear one task's mark; (disputed now, marked, cleared)."""
    is_disputed = resolve(annotations, spec, adjudicators).status is LabelStatus.DISPUTED
    has_mark = data.get(REVIEW_FIELD) == DISPUTED
    if is_disputed == has_mark:
        return is_disputed, 0, 0
    new = dict(data)
    if is_disputed:
        new[REVIEW_FIELD] = DISPUTED
    else:
        new.pop(REVIEW_FIELD, None)
    client.tasks.update(str(task_id), data=new)
    return is_disputed, int(is_disputed), int(not is_disputed)


def mark_disputed(client, project_id: int, spec: ModelSpec, adjudicators: frozenset[str]) -> tuple[int, int, int]:
    """Set or clear ``data.mammoflag_review`` on every annotated task; (disputed, marked, cleared)."""
    disputed = marked = cleared = 0
    for task in iter_annotated_tasks(client, project_id):
        d, m, c = _refresh(client, int(task["id"]), task.get("data") or {}, task.get("annotations") or [], spec,
                           adjudicators)
        disputed, marked, cleared = disputed + d, marked + m, cleared + c
    return disputed, marked, cleared


# Label Studio webhook actions after which a task's readers may agree, disagree or be adjudicated anew
REVIEW_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"})


def webhook_task_ids(payload: Mapping[str, Any]) -> tuple[int, ...]:
    """The tasks an annotation webhook is about (pure): ``annotation.task`` and ``task.id``, one or a list each;
    () for any other action."""
    if payload.get("action") not in REVIEW_ACTIONS:
        return ()
    ids: list[int] = []

    def items(value: Any) -> Iterable[Any]:
        return value if isinstance(value, list) else [value]

    for ann in items(payload.get("annotation")):
        task = ann.get("task") if isinstance(ann, Mapping) else None
        task = task.get("id") if isinstance(task, Mapping) else task
        if isinstance(task, int) and not isinstance(task, bool):
            ids.append(task)
    for task in items(payload.get("task")):
        tid = task.get("id") if isinstance(task, Mapping) else None
        if isinstance(tid, int) and not isinstance(tid, bool):
            ids.append(tid)
    return tuple(sorted(set(ids)))


def _as_dict(obj: Any) -> dict[str, Any]:
    """An SDK object (pydantic) as the plain dict of a JSON export."""
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else dict(obj)


@dataclass(frozen=True)
class TaskRefresh:
    task_ids: tuple[int, ...]
    disputed: int  # of these tasks, disputed now
    marked: int
    cleared: int


def refresh_tasks(client, task_ids: Sequence[int], spec: ModelSpec, adjudicators: frozenset[str]) -> TaskRefresh:
    """Refresh the disputed marks of these tasks only (two Label Studio reads and at most one write each).

    ``adjudicators`` are configured names (emails or user ids), resolved to ids once per call."""
    adjudicator_set = adjudicator_ids(client, adjudicators) if adjudicators else frozenset()
    disputed = marked = cleared = 0
    for task_id in task_ids:
        task = _as_dict(client.tasks.get(str(task_id)))
        annotations = [_as_dict(a) for a in client.annotations.list(id=task_id)]
        d, m, c = _refresh(client, task_id, task.get("data") or {}, annotations, spec, adjudicator_set)
        disputed, marked, cleared = disputed + d, marked + m, cleared + c
    return TaskRefresh(tuple(task_ids), disputed, marked, cleared)


def ensure_review(client, project_id: int, spec: ModelSpec, adjudicators: frozenset[str],
                  overlap: Overlap | None = None) -> ReviewSetup:
    """Overlap as asked (unchanged when None), the disputed tab, and the disputed marks refreshed."""
    project = ensure_overlap(client, project_id, overlap) if overlap else client.projects.get(project_id)
    view = ensure_disputed_view(client, project_id)
    disputed, marked, cleared = mark_disputed(client, project_id, spec, adjudicator_ids(client, adjudicators))
    return ReviewSetup(project_id, int(project.maximum_annotations or 1), int(project.overlap_cohort_percentage or 0),
                       int(view.id), disputed, marked, cleared)
