"""Study-level flags, per-image rows and the errors file, streamed out of the checkpoint.

Rule (the one a reader can check by hand): an image flags a class when a human labelled
it so, or, when no human labelled it, when the model's calibrated probability is at or
above the class threshold. Any flagged image flags its study. ``max_prob_<cls>`` is the
largest *effective* probability in the study (a human label counts as 1.0 or 0.0), so
``flag_<cls> == (max_prob_<cls> >= threshold_<cls>)`` always holds. ``source_<cls>``
says who decided: ``human`` when a human-labelled image raised the flag (or, for an
unflagged study, when humans labelled every image), else ``model``.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from flagger.checkpoint import Checkpoint
from flagger.reliability import ClassSelection
from flagger.records import HINT_FIELDS, ImageRecord
from mammoflag.datadir import header_flags, image_type_3
from mammoflag.fileio import atomic_path, safe_row
from mammoflag.novelty import study_mean
from mammoflag.spec import ModelSpec

ERROR_COLUMNS = ("input", "path", "unit", "key", "status", "reason")


@dataclass
class StudyCounts:
    studies: int = 0
    images: int = 0
    human_labelled_images: int = 0
    flagged: Counter = field(default_factory=Counter)  # class -> studies flagged
    flagged_by_human: Counter = field(default_factory=Counter)  # class -> of those, flags from humans
    manufacturers: Counter = field(default_factory=Counter)  # the study's manufacturer column -> studies
    novelty_study_means: Counter = field(default_factory=Counter)  # mammoflag.novelty.study_mean -> studies
    # the study's manufacturer -> images with a novelty (the version kept a reference), and of those beyond 1
    novelty_by_manufacturer: Counter = field(default_factory=Counter)
    novel_by_manufacturer: Counter = field(default_factory=Counter)

    @property
    def novelty_images(self) -> int:
        return sum(self.novelty_by_manufacturer.values())

    @property
    def novel_images(self) -> int:
        return sum(self.novel_by_manufacturer.values())


def flags_columns(classes: Sequence[str]) -> list[str]:
    cols = ["study_id", "image_count"]
    for prefix in ("flag", "max_prob", "threshold", "source", "flagged_by", "reliable"):
        cols += [f"{prefix}_{c}" for c in classes]
    return cols + ["manufacturer", "patient_key", "human_labelled_images", "novelty", "model_version",
                   "model_variant"]


def images_columns(classes: Sequence[str]) -> list[str]:
    cols = ["key", "study_id", *[f for f in HINT_FIELDS if f != "study_instance_uid"]]
    for prefix in ("prob", "model_flag", "human", "flag"):
        cols += [f"{prefix}_{c}" for c in classes]
    return cols + ["header_mag_view", "header_spot_compression", "header_biopsy_image", "novelty", "model_version"]


def write_outputs(checkpoint: Checkpoint, model: str, spec: ModelSpec, version_name: str, variant: str,
                  flags_out: Path, images_out: Path | None, errors_out: Path,
                  selection: ClassSelection) -> tuple[StudyCounts, int]:
    """Write flags.csv (and images.csv) in one sorted pass over the checkpoint, then the errors file.

    Classes outside ``selection.flagged`` (not learned, by the trust gate) get empty flag, source
    and flagged_by cells; their probabilities are still written.
    """
    thresholds = [spec.thresholds.get(c, 0.5) for c in spec.classes]
    counts = StudyCounts()
    with _atomic_csv(flags_out, flags_columns(spec.classes)) as flags_writer, \
            _atomic_csv(images_out, images_columns(spec.classes)) as images_writer:
        rows = checkpoint.iter_images(model)
        for study_id, group in itertools.groupby(rows, key=lambda r: r[0].hints["study_instance_uid"]):
            images = list(group)  # one study: a handful of images
            flags_writer.writerow(_study_row(study_id, images, spec, thresholds, version_name, variant, counts,
                                             selection))
            if images_writer:
                for record, human in images:
                    images_writer.writerow(_image_row(record, human, spec, thresholds, version_name, selection))
    errors = 0
    with _atomic_csv(errors_out, list(ERROR_COLUMNS)) as errors_writer:
        for row in checkpoint.iter_errors(model):
            errors_writer.writerow([row[c] for c in ERROR_COLUMNS])
            errors += 1
    return counts, errors


def image_flags(record: ImageRecord, human: tuple[int, ...] | None, thresholds: Sequence[float]) -> list[bool]:
    if human is not None:
        return [bool(h) for h in human]
    return [p >= t for p, t in zip(record.probs, thresholds)]


def _study_row(study_id: str, images: list[tuple[ImageRecord, tuple[int, ...] | None]], spec: ModelSpec,
               thresholds: list[float], version_name: str, variant: str, counts: StudyCounts,
               selection: ClassSelection) -> list[str]:
    n_classes = len(spec.classes)
    flags, max_probs, sources, raised_by = [], [], [], []
    human_images = sum(1 for _, h in images if h is not None)
    image_flag_rows = [image_flags(r, h, thresholds) for r, h in images]  # once per image, not per class
    for c in range(n_classes):
        raising = [(r, h) for (r, h), f in zip(images, image_flag_rows) if f[c]]
        effective = [float(h[c]) if h is not None else r.probs[c] for r, h in images]
        flagged = bool(raising)
        if flagged:
            from_human = any(h is not None for _, h in raising)
        else:
            from_human = human_images == len(images)
        max_probs.append(f"{max(effective):.6f}")
        if spec.classes[c] not in selection.flagged:
            flags.append("")
            sources.append("")
            raised_by.append("")
            continue
        flags.append(int(flagged))
        sources.append("human" if from_human else "model")
        raised_by.append("|".join(_image_label(r) for r, _ in raising))
        if flagged:
            counts.flagged[spec.classes[c]] += 1
            counts.flagged_by_human[spec.classes[c]] += int(from_human)
    counts.studies += 1
    counts.images += len(images)
    counts.human_labelled_images += human_images
    manufacturers = Counter(r.hints["manufacturer"] for r, _ in images if r.hints["manufacturer"])
    patient_keys = {r.hints["patient_key"] for r, _ in images if r.hints["patient_key"]}
    reliable = [int(selection.reliable(c)) for c in spec.classes]
    manufacturer = manufacturers.most_common(1)[0][0] if manufacturers else ""
    counts.manufacturers[manufacturer] += 1
    novelty = [r.novelty for r, _ in images if r.novelty is not None]
    if novelty:
        counts.novelty_study_means[study_mean(novelty)] += 1
        counts.novelty_by_manufacturer[manufacturer] += len(novelty)
        counts.novel_by_manufacturer[manufacturer] += sum(1 for n in novelty if n > 1.0)
    return [study_id, len(images), *flags, *max_probs, *[f"{t:g}" for t in thresholds], *sources, *raised_by,
            *reliable, manufacturer,
            patient_keys.pop() if len(patient_keys) == 1 else "|".join(sorted(patient_keys)),
            human_images, _novelty_cell(max(novelty) if novelty else None), version_name, variant]


def _novelty_cell(novelty: float | None) -> str:
    return "" if novelty is None else f"{novelty:.3f}"


def _image_label(record: ImageRecord) -> str:
    """'<sop uid>:<frame> <view> <laterality>', the image as a radiologist looks it up."""
    h = record.hints
    return f"{record.key} {h['view_position'] or '?'} {h['laterality'] or '?'}"


def _image_row(record: ImageRecord, human: tuple[int, ...] | None, spec: ModelSpec, thresholds: list[float],
               version_name: str, selection: ClassSelection) -> list[str]:
    h = record.hints
    shown = [c in selection.flagged for c in spec.classes]
    model_flags = [int(f) if ok else "" for f, ok in zip(image_flags(record, None, thresholds), shown)]
    humans = [str(v) for v in human] if human is not None else [""] * len(spec.classes)
    flags = [int(f) if ok else "" for f, ok in zip(image_flags(record, human, thresholds), shown)]
    return [record.key, h["study_instance_uid"], *[h[f] for f in HINT_FIELDS if f != "study_instance_uid"],
            *[f"{p:.6f}" for p in record.probs], *model_flags, *humans, *flags,
            *header_hints(h), _novelty_cell(record.novelty), version_name]


def header_hints(hints: dict[str, str]) -> list[int]:
    """What the DICOM header alone says: magnification, spot compression, biopsy-procedure image.

    Compared with the model's columns these find header-vs-model disagreements (a mag view
    the header does not mark, a clip on a screening image no header can know about).
    """
    # the importer normalised the view modifier codes and meanings to names: compare names only
    flags = header_flags(hints.get("view_modifiers", ""), image_type_3(hints.get("image_type", "")))
    return [int(f) for f in flags]


class _SafeWriter:
    """A csv.writer whose every cell is spreadsheet-safe (mammoflag.fileio.safe_cell)."""

    def __init__(self, fh):
        self._writer = csv.writer(fh)

    def writerow(self, row: Sequence[Any]) -> None:
        self._writer.writerow(safe_row(row))


@contextmanager
def _atomic_csv(path: Path | None, header: list[str]) -> Iterator[_SafeWriter | None]:
    """A CSV writer whose file appears complete or not at all (mammoflag.fileio.atomic_path), cells neutralised."""
    if path is None:
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = _SafeWriter(f)
        writer.writerow(header)
        yield writer
        f.flush()
        os.fsync(f.fileno())
