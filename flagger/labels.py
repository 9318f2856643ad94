"""Human labels: the annotators' answers override the model for the images they labelled.

They come from a Label Studio JSON export file or straight from a project (its annotated
tasks, read page by page through label-studio-sdk in the export's JSON shape). A task's label is
what the one label resolver (:func:`mammoflag.labels.resolve`) makes of its readers' answers:
a single reader's answer, the readers' consensus, or an adjudicator's answer. A disputed task
(readers disagree, no adjudication yet) is no human label: the model decides that image and
the study row never says ``source=human`` for it. The task's ``key`` data field is the image
key the flagger uses everywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mammoflag.spec import ModelSpec
from mammoflag.labels import LabelStatus, resolve

log = logging.getLogger(__name__)


class LabelsError(ValueError):
    """The labels source cannot be read."""


@dataclass
class HumanLabels:
    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)  # image key -> 0/1 per class
    tasks_seen: int = 0
    unusable: int = 0  # annotated tasks whose answer could not be read (no key, unknown choice)
    disputed: int = 0  # readers disagree and no adjudicator answered: the model decides these

    @property
    def source_summary(self) -> str:
        return (f"{len(self.labels)} labelled images from {self.tasks_seen} tasks ({self.unusable} unusable, "
                f"{self.disputed} disputed)")


def labels_from_tasks(tasks: Iterable[dict[str, Any]], spec: ModelSpec,
                      adjudicators: frozenset[str] = frozenset()) -> HumanLabels:
    out = HumanLabels()
    for task in tasks:
        out.tasks_seen += 1
        resolution = resolve(task.get("annotations") or [], spec, adjudicators)
        if resolution.status is LabelStatus.UNLABELLED:
            continue
        if resolution.status is LabelStatus.DISPUTED:
            out.disputed += 1
            continue
        key = (task.get("data") or {}).get("key")
        if not key or not resolution.is_human_label or resolution.choices is None:
            out.unusable += 1
            continue
        out.labels[str(key)] = tuple(int(c in resolution.choices) for c in spec.classes)
    return out


def labels_from_export_file(path: Path, spec: ModelSpec, adjudicators: frozenset[str] = frozenset()) -> HumanLabels:
    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelsError(f"labels export {Path(path).name}: not a readable JSON export ({type(exc).__name__})") from exc
    if not isinstance(tasks, list):
        raise LabelsError(f"labels export {Path(path).name}: expected a JSON list of tasks")
    return labels_from_tasks(tasks, spec, adjudicators)


def labels_from_project(client, id_or_title: str, spec: ModelSpec,
                        adjudicators: frozenset[str] = frozenset()) -> HumanLabels:
    """Read the project's annotated tasks live, page by page (Label Studio filters them)."""
    from mammoflag.labelstudio import LabelStudioError, adjudicator_ids, find_project, iter_annotated_tasks

    project = find_project(client, id_or_title)
    if project is None:
        raise LabelStudioError(f"no Label Studio project {id_or_title!r}")
    labels = labels_from_tasks(iter_annotated_tasks(client, project.id), spec, adjudicator_ids(client, adjudicators))
    log.info("human labels from project %s: %s", project.id, labels.source_summary)
    return labels


def load_human_labels(source: str, spec: ModelSpec, settings) -> HumanLabels:
    """``source`` is an export JSON file when such a file exists, else a project id or title."""
    if Path(source).is_file():
        return labels_from_export_file(Path(source), spec, settings.adjudicators)
    from mammoflag.labelstudio import connect

    return labels_from_project(connect(settings), source, spec, settings.adjudicators)
