"""Human labels: the annotators' answers override the model for the images they labelled.

They come from a Label Studio JSON export file or straight from a project (its annotated
tasks, read page by page through label-studio-sdk in the export's JSON shape). A task's label is
its most recent submitted, not-cancelled annotation; the task's ``key`` data field is
the image key the flagger uses everywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mammoflag.spec import ModelSpec
from mammoflag.labels import annotation_order, answer_problem, choices_of

log = logging.getLogger(__name__)


class LabelsError(ValueError):
    """The labels source cannot be read."""


@dataclass
class HumanLabels:
    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)  # image key -> 0/1 per class
    tasks_seen: int = 0
    unusable: int = 0  # annotated tasks whose answer could not be read (no key, unknown choice)

    @property
    def source_summary(self) -> str:
        return f"{len(self.labels)} labelled images from {self.tasks_seen} tasks ({self.unusable} unusable)"


def labels_from_tasks(tasks: Iterable[dict[str, Any]], spec: ModelSpec) -> HumanLabels:
    out = HumanLabels()
    for task in tasks:
        out.tasks_seen += 1
        live = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        annotation = max(live, key=annotation_order, default=None)
        if annotation is None:
            continue
        key = (task.get("data") or {}).get("key")
        chosen = choices_of(annotation, spec)
        if not key or answer_problem(chosen, spec):  # no answer, unknown choices, or "neither" with a finding
            out.unusable += 1
            continue
        out.labels[str(key)] = tuple(int(c in chosen) for c in spec.classes)
    return out


def labels_from_export_file(path: Path, spec: ModelSpec) -> HumanLabels:
    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelsError(f"labels export {Path(path).name}: not a readable JSON export ({type(exc).__name__})") from exc
    if not isinstance(tasks, list):
        raise LabelsError(f"labels export {Path(path).name}: expected a JSON list of tasks")
    return labels_from_tasks(tasks, spec)


def labels_from_project(client, id_or_title: str, spec: ModelSpec) -> HumanLabels:
    """Read the project's annotated tasks live, page by page (Label Studio filters them)."""
    from mammoflag.labelstudio import LabelStudioError, find_project, iter_annotated_tasks

    project = find_project(client, id_or_title)
    if project is None:
        raise LabelStudioError(f"no Label Studio project {id_or_title!r}")
    labels = labels_from_tasks(iter_annotated_tasks(client, project.id), spec)
    log.info("human labels from project %s: %s", project.id, labels.source_summary)
    return labels


def load_human_labels(source: str, spec: ModelSpec, settings) -> HumanLabels:
    """``source`` is an export JSON file when such a file exists, else a project id or title."""
    if Path(source).is_file():
        return labels_from_export_file(Path(source), spec)
    from mammoflag.labelstudio import connect

    return labels_from_project(connect(settings), source, spec)
