"""Import an import DATA_DIR's tasks into a Label Studio project, never twice.

Tasks reference their images through Label Studio's local-file serving
(``/data/local-files/?d=<path relative to the data root>``): nothing is uploaded, so a
million images cost no copies. The project's existing task keys (``data.key`` =
``<SOPInstanceUID>:<frame>``) are read first and only new tasks are sent, in chunks, so
re-running an import (or importing an overlapping DATA_DIR) adds nothing twice.

Two imports into one project at the same time can both find a key absent and both send it.
Without a lock between machines, each import checks afterwards: when the project grew by more
than it sent, it lists the keys again and deletes the later, unannotated copies. Every import
applies the same rule (keep the first copy, and any copy someone annotated), and the import that
made the later copy of a pair always lists after both exist, so every pair is resolved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from label_studio_sdk.core.api_error import ApiError

from importers.run import MANIFEST_FILE, iter_tasks
from mammoflag.labelstudio import ensure_local_storage, find_or_create_project
from mammoflag.poolstate import load_state, register_archives

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1000  # tasks per import request: far below Label Studio's 250k / 200 MB limit
KEY_PAGE_SIZE = 1000


class OutsideDataRoot(ValueError):
    """The DATA_DIR is not below the data root, so Label Studio could not serve its images."""


@dataclass
class LabelStudioImport:
    project_id: int
    project_title: str
    created: int  # tasks sent to Label Studio by this run
    already_present: int  # tasks whose key the project already had
    duplicates_removed: int = 0  # copies a concurrent import made of the same key, deleted
    duplicates_annotated: int = 0  # extra copies kept because someone already annotated them
    pooled: bool = False  # the project has a labeling pool: the DATA_DIR was registered as an archive, nothing sent
    archives: tuple[str, ...] = ()  # with a pool: every archive it draws from (relative to the data root)

    def as_text(self) -> str:
        if self.pooled:
            return (f"Label Studio project {self.project_id} ({self.project_title!r}) has a labeling pool: this "
                    f"DATA_DIR is indexed as one of its archives {list(self.archives)}; no task sent, the pool's "
                    f"fill (mammoflag.fill_pool) and its top-up rounds choose which images go to Label Studio")
        text = (f"Label Studio project {self.project_id} ({self.project_title!r}): {self.created} tasks added, "
                f"{self.already_present} already there")
        if self.duplicates_removed or self.duplicates_annotated:
            text += (f"; another import ran at the same time: {self.duplicates_removed} duplicate tasks removed, "
                     f"{self.duplicates_annotated} annotated duplicates kept")
        return text


def check_inside_data_root(data_dir: str | Path, data_root: str | Path) -> tuple[Path, Path]:
    """Both folders resolved; OutsideDataRoot unless data_dir lies below data_root."""
    data_dir, data_root = Path(data_dir).resolve(), Path(data_root).resolve()
    if not data_dir.is_relative_to(data_root) or data_dir == data_root:
        # Label Studio serves local files only below the data root (its LOCAL_FILES_DOCUMENT_ROOT), and
        # only through a storage on a subfolder: it refuses a storage on the document root itself.
        raise OutsideDataRoot(
            f"--out {data_dir} is not inside the data root {data_root} (MAMMOFLAG_DATA_ROOT): Label Studio serves "
            f"task images only from a subfolder of the data root. Import into a folder under it.")
    return data_dir, data_root


def keyed_tasks(client, project_id: int, include: str = "id,data") -> Iterator[tuple[Any, str]]:
    """``(task, data.key)`` for every task of the project that has a key, page by page."""
    for task in client.tasks.list(project=project_id, page_size=KEY_PAGE_SIZE, fields="task_only", include=include):
        key = (task.data or {}).get("key")
        if key:
            yield task, str(key)


def existing_task_keys(client, project_id: int) -> set[str]:
    """The ``data.key`` of every task in the project (tasks without one are ignored)."""
    return {key for _, key in keyed_tasks(client, project_id)}


def duplicate_tasks_to_delete(tasks: Iterable[tuple[int, str, int]]) -> tuple[list[int], int]:
    """``(id, key, total_annotations)`` rows -> (ids to delete, annotated duplicates kept) (pure).

    Per key the first task (lowest id) stays, and so does every copy someone annotated: a
    person's work is never deleted. The rule only depends on the rows, so concurrent imports
    that apply it agree on which copy survives.
    """
    by_key: dict[str, list[tuple[int, int]]] = {}
    for task_id, key, n_annotations in tasks:
        by_key.setdefault(key, []).append((task_id, n_annotations))
    delete, annotated_kept = [], 0
    for copies in by_key.values():
        if len(copies) < 2:
            continue
        copies.sort()
        for task_id, n_annotations in copies[1:]:
            if n_annotations:
                annotated_kept += 1
            else:
                delete.append(task_id)
    return delete, annotated_kept


def remove_duplicate_tasks(client, project_id: int) -> tuple[int, int]:
    """Delete the project's extra unannotated copies of a key; (deleted, annotated copies kept)."""
    rows = ((t.id, key, t.total_annotations or 0)
            for t, key in keyed_tasks(client, project_id, include="id,data,total_annotations"))
    delete, annotated_kept = duplicate_tasks_to_delete(rows)
    deleted = 0
    for task_id in delete:
        try:
            client.tasks.delete(task_id)
            deleted += 1
        except ApiError as exc:
            if exc.status_code != 404:  # 404: the other import deleted it first
                raise
    if delete or annotated_kept:
        log.warning("project %s: a concurrent import sent the same images; %d duplicate tasks removed, %d annotated "
                    "duplicates kept", project_id, deleted, annotated_kept)
    return deleted, annotated_kept


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def import_tasks_to_label_studio(client, id_or_title: str | int, data_dir: str | Path, data_root: str | Path,
                                 label_config_xml: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> LabelStudioImport:
    """Create or update the project, give it local-file access to DATA_DIR, add the DATA_DIR's new tasks.

    The local storage is on DATA_DIR, not the data root: Label Studio refuses a storage on its
    document root, and serves ``/data/local-files/?d=`` only below some storage of the project.

    A project with a labeling pool (``mammoflag.poolstate``: ``setup-project --archive`` made one)
    gets no task here: the DATA_DIR is registered as one more archive of its pool (idempotent) and
    the result says ``pooled``; the caller sends the pool's fill (``mammoflag.fill_pool``), whose
    stratified cold start, and later top-up rounds, choose what enters Label Studio.
    """
    data_dir, data_root = check_inside_data_root(data_dir, data_root)
    if not (data_dir / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{data_dir / MANIFEST_FILE} does not exist: run `mammoflag import` into it first")
    project = find_or_create_project(client, id_or_title, label_config_xml)
    ensure_local_storage(client, project.id, data_dir)  # pooled or not: Label Studio must serve its images
    if load_state(data_root, project.id) is not None:
        state = register_archives(data_root, project.id, [data_dir])
        return LabelStudioImport(project.id, project.title, created=0, already_present=0, pooled=True,
                                 archives=state.archives)
    count_before = _task_count(client, project.id)
    known = existing_task_keys(client, project.id)
    result = LabelStudioImport(project.id, project.title, created=0, already_present=0)

    def new_tasks() -> Iterator[dict[str, Any]]:
        for task in iter_tasks(data_dir, data_root):
            key = task["data"]["key"]
            if key in known:
                result.already_present += 1
                continue
            known.add(key)
            yield task

    for chunk in chunks(new_tasks(), chunk_size):
        client.projects.import_tasks(project.id, request=chunk)
        result.created += len(chunk)
        log.info("imported %d tasks into Label Studio project %s (%d so far)", len(chunk), project.id,
                 result.created)
    if result.created and _task_count(client, project.id) > count_before + result.created:
        # someone else added tasks meanwhile: perhaps the same images (see the module docstring)
        result.duplicates_removed, result.duplicates_annotated = remove_duplicate_tasks(client, project.id)
    return result


def _task_count(client, project_id: int) -> int:
    return client.projects.get(project_id).task_number or 0
