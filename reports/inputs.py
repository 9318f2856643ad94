"""What a report is built from, as typed records: one per human-read task, one per model version.

Read from a Label Studio project (annotated tasks only, page by page) or from an export's task
dicts: the same readers (``mammoflag.labels``) decide each task's label as training and the
flagger do. A record keeps reader ids (Label Studio user ids), header hints without patient
identifiers, the display image's path below the data root, and when the first answer came.

"Site" is whatever the import says it is: the task's ``site`` value when the import wrote one
(an import name, a keyed hash of the institution), else the import folder below the data root.
Never an institution's name read from a header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from mammoflag.card import UNKNOWN_MANUFACTURER
from mammoflag.datadir import LIST_SEPARATOR, header_flags, image_type_3
from mammoflag.header_evidence import header_evidence
from mammoflag.labels import Resolution, answer_problem, choices_of, latest_per_reader, resolve
from mammoflag.paths import UnsafeImagePath, resolve_task_image
from mammoflag.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeaderSays:
    magnification: bool
    spot_compression: bool
    biopsy_image: bool  # Image Type value 3 of a stereotactic / biopsy-procedure image


@dataclass(frozen=True)
class TaskRecord:
    task_id: int
    key: str  # <sop_instance_uid>:<frame>
    site: str
    manufacturer: str
    device_model: str
    view: str  # "CC L": the annotator's hint, no identifier
    header: HeaderSays
    reads: Mapping[str, frozenset[str]]  # reader id -> latest usable answer
    resolution: Resolution
    first_read_at: datetime | None  # when the first submitted answer was made
    image: Path | None  # the display PNG (None when the URL does not resolve below the data root)
    group: str = ""  # patient key, for grouping only (never shown)
    evidence: tuple[float, ...] = ()  # mammoflag.header_evidence of its header hints: what the model weighs


def _as_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return tuple(v for v in str(value or "").split(LIST_SEPARATOR) if v)


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.now().astimezone().tzinfo)


def site_of(data: Mapping[str, Any], image_url: str) -> str:
    """The task's ``site`` when the import set one, else the import folder (first part of the d= path)."""
    if data.get("site"):
        return str(data["site"])
    from urllib.parse import parse_qs, urlsplit

    d = parse_qs(urlsplit(image_url).query).get("d") or [""]
    parts = PurePosixPath(d[0]).parts
    return parts[0] if len(parts) > 1 else "(unknown)"


def header_of(data: Mapping[str, Any]) -> HeaderSays:
    modifiers = _as_list(data.get("view_modifiers"))
    image_type = _as_list(data.get("image_type"))
    mag, spot, biopsy = header_flags(modifiers, image_type_3(image_type))
    return HeaderSays(mag, spot, biopsy)


def record_of_task(task: Mapping[str, Any], spec: ModelSpec, data_root: Path, image_key: str = "image",
                   adjudicators: frozenset[str] = frozenset()) -> TaskRecord:
    data = task.get("data") or {}
    annotations = list(task.get("annotations") or [])
    reads: dict[str, frozenset[str]] = {}
    for who, ann in sorted(latest_per_reader(annotations).items()):
        chosen = choices_of(ann, spec)
        if answer_problem(chosen, spec) is None:
            reads[who] = frozenset(chosen)
    times = [t for a in annotations if not a.get("was_cancelled")
             if (t := _parse_time(a.get("created_at"))) is not None]
    url = str(data.get(image_key) or "")
    try:
        image = resolve_task_image(url, data_root) if url else None
    except UnsafeImagePath:
        image = None
    view = " ".join(str(data.get(k) or "") for k in ("view_position", "laterality")).strip()
    return TaskRecord(
        task_id=int(task.get("id") or 0), key=str(data.get("key") or f"task-{task.get('id')}"),
        site=site_of(data, url), manufacturer=str(data.get("manufacturer") or UNKNOWN_MANUFACTURER),
        device_model=str(data.get("model") or "(unknown)"), view=view, header=header_of(data), reads=reads,
        resolution=resolve(annotations, spec, adjudicators), first_read_at=min(times) if times else None,
        image=image, group=str(data.get("patient_key") or data.get("study_instance_uid") or ""),
        evidence=tuple(float(v) for v in header_evidence(data)))


def records_from_tasks(tasks: Iterable[Mapping[str, Any]], spec: ModelSpec, data_root: Path, image_key: str = "image",
                       adjudicators: frozenset[str] = frozenset()) -> tuple[TaskRecord, ...]:
    """Records of the tasks someone answered (skips alone do not count)."""
    out = []
    for task in tasks:
        rec = record_of_task(task, spec, data_root, image_key, adjudicators)
        if rec.first_read_at is not None or rec.reads:
            out.append(rec)
    return tuple(out)


@dataclass(frozen=True)
class AuditImage:
    """One image of a flagged cohort (images.csv): what the header says and what the model decided."""

    manufacturer: str
    header: HeaderSays
    model_flags: Mapping[str, bool]


def audit_images_from_csv(path: Path, classes: Sequence[str]) -> tuple[AuditImage, ...]:
    """The flagger's images.csv (docs/CONTRACTS.md "Flagger outputs") as audit rows."""
    import csv

    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            flags = {c: row.get(f"model_flag_{c}") == "1" for c in classes if f"model_flag_{c}" in row}
            header = HeaderSays(row.get("header_mag_view") == "1", row.get("header_spot_compression") == "1",
                                row.get("header_biopsy_image") == "1")
            out.append(AuditImage(row.get("manufacturer") or UNKNOWN_MANUFACTURER, header, flags))
    return tuple(out)
