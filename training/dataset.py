"""Labelled images for training, read from Label Studio (live or from a JSON export).

A Label Studio task carries one display image and the annotations of every reader who
opened it. Training needs one multi-label target per image, so this module:

- drops cancelled (skipped) annotations: a skip says nothing about the image;
- keeps each reader's latest annotation (a reader who changed their mind counts once);
- resolves the readers' answers with the one label resolver (:func:`mammoflag.labels.resolve`):
  disputed tasks (readers disagree, no adjudicator yet) are left out and listed, never silently
  resolved — those are exactly the images a radiologist should look at; an adjudicator's
  answer wins;
- leaves out contradictory results (``neither`` together with a finding) and listed;
- turns the agreed choice set into one 0/1 target per finding class of the model spec
  (``neither`` means all zeros);
- resolves the task image URL to the display PNG under the data root (never outside it).

Every task is accounted for: it is either a :class:`LabelledImage` or a :class:`LeftOut`
with a reason, or it has no usable annotation yet (counted in ``unlabelled``). Reasons name
the task id and the field, never a patient identifier.

The train/validation split is a pure function of the patient key (study when absent): a hash,
so a patient stays on the same side in every retrain and validation never leaks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from mammoflag.card import LeftOut
from mammoflag.header_evidence import header_evidence
from mammoflag.labels import LabelStatus, reader_choice_sets, resolve, target_for
from mammoflag.paths import UnsafeImagePath, resolve_task_image
from mammoflag.agreement import AgreementCounter
from mammoflag.spec import ModelSpec

log = logging.getLogger(__name__)

# Changing the salt or the fraction re-deals every patient: the validation split is then
# no longer the one earlier versions were compared on. Both are recorded in each model card.
SPLIT_SALT = "mammoflag-split-v1"
DEFAULT_VALID_FRACTION = 0.2


class DatasetError(ValueError):
    """The annotation source as a whole cannot be read (not one bad task: those are left out)."""


@dataclass(frozen=True)
class LabelledImage:
    task_id: int | None
    key: str  # "<sop_instance_uid>:<frame>", the dedupe key everywhere
    image: Path  # display PNG below the data root
    target: tuple[float, ...]  # one 0/1 per spec class, in spec order
    group: str  # patient_key, else study uid, else key: what the split keeps together
    readers: int  # how many readers agreed on the target
    manufacturer: str = ""  # the header hint, for performance per vendor
    first_read_at: str | None = None  # created_at (ISO 8601) of the task's first submitted answer
    header: tuple[float, ...] = ()  # mammoflag.header_evidence of the task's header hints (HEADER_FEATURES order)


@dataclass(frozen=True)
class LabelledSet:
    """What training gets: the usable images, the left-out tasks with reasons, and counts."""

    items: tuple[LabelledImage, ...]
    left_out: tuple[LeftOut, ...]
    unlabelled: int  # tasks with no annotation that counts (none, or only skips)
    annotations: int  # submitted (not cancelled) annotations read
    max_annotation_id: int  # to count "new since the last version" on the next run
    source: str  # "project 3" or "export <file name>"; never a path that may carry names
    classes: tuple[str, ...] = field(default=())
    annotation_ids: tuple[int, ...] = field(default=(), repr=False)  # submitted annotations
    reader_agreement: dict[str, Any] = field(default_factory=dict)  # mammoflag.agreement's report
    sampling: str | None = None  # the project's Label Studio sampling setting when read; None for an export

    def new_annotations_since(self, max_annotation_id: int) -> int:
        """Submitted annotations created after the one with this id (ids only grow in Label Studio)."""
        return sum(1 for i in self.annotation_ids if i > max_annotation_id)

    @property
    def fingerprint(self) -> str:
        """A hash of what training sees: which images with which targets (order-free)."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.classes)).encode())
        for item in sorted(self.items, key=lambda i: i.key):
            h.update(f"{item.key}\t{item.group}\t{','.join(str(int(t)) for t in item.target)}\n".encode())
        return h.hexdigest()[:16]

    def label_counts(self) -> dict[str, int]:
        """Positives per class, plus the all-negative count under the key 'negative'."""
        counts = {c: int(sum(i.target[k] for i in self.items)) for k, c in enumerate(self.classes)}
        counts["negative"] = sum(1 for i in self.items if not any(i.target))
        return counts

    def split(self, valid_fraction: float = DEFAULT_VALID_FRACTION) -> tuple[list[LabelledImage], list[LabelledImage]]:
        train, valid = [], []
        for item in self.items:
            (valid if split_of(item.group, valid_fraction) == "valid" else train).append(item)
        return train, valid


# -- the split -----------------------------------------------------------------------------------

def split_of(group: str, valid_fraction: float = DEFAULT_VALID_FRACTION, salt: str = SPLIT_SALT) -> str:
    """'train' or 'valid' for a patient key: a fixed hash, so the answer never changes between runs."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
    digest = hashlib.sha256(f"{salt}:{group}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "valid" if unit < valid_fraction else "train"


def group_of(data: Mapping[str, Any], key: str) -> str:
    """Patient key when the importer had a PatientID; else the study; else the image itself."""
    for field_name in ("patient_key", "study_instance_uid"):
        value = data.get(field_name)
        if value:
            return f"{field_name}:{value}"
    return f"key:{key}"


# -- one task ------------------------------------------------------------------------------------

# -- a whole task list ---------------------------------------------------------------------------

def labelled_set_from_tasks(tasks: Iterable[Mapping[str, Any]], spec: ModelSpec, data_root: Path, source: str,
                            min_agreement: float = 1.0, adjudicators: frozenset[str] = frozenset()) -> LabelledSet:
    """Consensus targets and resolved images for Label Studio task dicts (export or API shape)."""
    items: list[LabelledImage] = []
    left_out: list[LeftOut] = []
    unlabelled = n_annotations = max_id = 0
    annotation_ids: list[int] = []
    seen_keys: set[str] = set()
    agreement = AgreementCounter(tuple(spec.classes))
    for task in tasks:
        task_id = task.get("id")
        data = task.get("data") or {}
        annotations = list(task.get("annotations") or [])
        agreement.add(reader_choice_sets(annotations, spec))
        submitted = [a for a in annotations if not a.get("was_cancelled")]
        n_annotations += len(submitted)
        annotation_ids.extend(int(a.get("id") or 0) for a in submitted)
        max_id = max([max_id, *(int(a.get("id") or 0) for a in annotations)])
        key = str(data.get("key") or f"task-{task_id}")
        agreed = resolve(annotations, spec, adjudicators, min_agreement)
        if agreed.status is LabelStatus.UNLABELLED:
            unlabelled += 1
            continue
        if not agreed.is_human_label or agreed.choices is None:
            left_out.append(LeftOut(task_id, key, f"task {task_id}: {agreed.status.value}: {agreed.reason}"))
            continue
        if key in seen_keys:
            # The importer dedupes by key; a second task for one image would count it twice.
            left_out.append(LeftOut(task_id, key, f"task {task_id}: data.key {key!r} repeats an earlier task"))
            continue
        url = data.get(spec.image_key)
        if not isinstance(url, str) or not url:
            left_out.append(LeftOut(task_id, key, f"task {task_id}: data.{spec.image_key} is missing"))
            continue
        try:
            image = resolve_task_image(url, data_root)
        except UnsafeImagePath as exc:
            left_out.append(LeftOut(task_id, key, f"task {task_id}: data.{spec.image_key}: {exc}"))
            continue
        if not image.is_file():
            left_out.append(LeftOut(task_id, key, f"task {task_id}: data.{spec.image_key}: no such file under the "
                                                  "data root"))
            continue
        seen_keys.add(key)
        items.append(LabelledImage(task_id, key, image, target_for(agreed.choices, spec), group_of(data, key),
                                   agreed.readers, str(data.get("manufacturer") or ""), first_answer_at(submitted),
                                   tuple(float(v) for v in header_evidence(data))))
    for gone in left_out:
        log.info("left out of training: %s", gone.reason)
    return LabelledSet(tuple(items), tuple(left_out), unlabelled, n_annotations, max_id, source, tuple(spec.classes),
                       tuple(annotation_ids), agreement.report())


def first_answer_at(annotations: Iterable[Mapping[str, Any]]) -> str | None:
    """The ``created_at`` of the earliest of these annotations (compared as instants), as Label Studio wrote it."""
    from datetime import datetime, timezone

    times = []
    for a in annotations:
        raw = a.get("created_at")
        try:
            t = datetime.fromisoformat(str(raw).replace("Z", "+00:00")) if raw else None
        except ValueError:
            t = None
        if t is not None:
            times.append((t if t.tzinfo else t.replace(tzinfo=timezone.utc), str(raw)))
    return min(times)[1] if times else None


def load_export(path: Path) -> list[dict[str, Any]]:
    """A Label Studio JSON export (a list of tasks with their annotations)."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"export file {Path(path).name}: not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"export file {Path(path).name}: not valid JSON ({exc})") from exc
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise DatasetError(f"export file {Path(path).name}: expected a JSON list of task objects "
                           "(Label Studio 'JSON' export format)")
    return tasks


def labelled_set_from_export(path: Path, spec: ModelSpec, data_root: Path, min_agreement: float = 1.0,
                             adjudicators: frozenset[str] = frozenset()) -> LabelledSet:
    return labelled_set_from_tasks(load_export(path), spec, data_root, f"export {Path(path).name}", min_agreement,
                                   adjudicators)


def labelled_set_from_project(client, project_id: int, spec: ModelSpec, data_root: Path,
                              min_agreement: float = 1.0, adjudicators: frozenset[str] = frozenset()) -> LabelledSet:
    """The labelled set of a live project: only its annotated tasks are read (filtered by Label Studio)."""
    from mammoflag.labelstudio import adjudicator_ids, iter_annotated_tasks

    project = client.projects.get(project_id)
    total = project.task_number or 0
    sampling = getattr(project, "sampling", None)
    sampling = str(getattr(sampling, "value", sampling)) if sampling else None
    read = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal read
        for task in iter_annotated_tasks(client, project_id):
            read += 1
            yield task

    labelled = labelled_set_from_tasks(counted(), spec, data_root, f"project {project_id}", min_agreement,
                                       adjudicator_ids(client, adjudicators))
    # tasks nobody annotated were not read: they count as unlabelled, as in an export
    return dataclasses.replace(labelled, unlabelled=labelled.unlabelled + max(0, total - read), sampling=sampling)
