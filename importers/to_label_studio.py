"""Import an import DATA_DIR's tasks into a Label Studio project, never twice.

Tasks reference their images through Label Studio's local-file serving
(``/data/local-files/?d=<path relative to the data root>``): nothing is uploaded, so a
million images cost no copies. The project's existing task keys (``data.key`` =
``<SOPInstanceUID>:<frame>``) are read first and only new tasks are sent, in chunks, so
re-running an import (or importing an overlapping DATA_DIR) adds nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from importers.run import MANIFEST_FILE, iter_tasks
from mammoflag.labelstudio import ensure_local_storage, find_or_create_project

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

    def as_text(self) -> str:
        return (f"Label Studio project {self.project_id} ({self.project_title!r}): {self.created} tasks added, "
                f"{self.already_present} already there")


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


def existing_task_keys(client, project_id: int) -> set[str]:
    """The ``data.key`` of every task in the project (tasks without one are ignored)."""
    keys: set[str] = set()
    for task in client.tasks.list(project=project_id, page_size=KEY_PAGE_SIZE, fields="task_only",
                                  include="id,data"):
        key = (task.data or {}).get("key")
        if key:
            keys.add(str(key))
    return keys


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
    """
    data_dir, data_root = check_inside_data_root(data_dir, data_root)
    if not (data_dir / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{data_dir / MANIFEST_FILE} does not exist: run `mammoflag import` into it first")
    project = find_or_create_project(client, id_or_title, label_config_xml)
    ensure_local_storage(client, project.id, data_dir)
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
    return result
