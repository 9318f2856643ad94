"""Flagger input: an import DATA_DIR (manifest.csv + display PNGs) or a folder of DICOM files.

``iter_units`` lists the input as work units, streaming (a million-row manifest or a deep
folder tree is never held in memory). ``prepare_unit`` turns one unit into model inputs;
it runs in decode processes, so it takes and returns plain picklable data.

Display PNGs are reused as the importer wrote them (nothing is decoded from DICOM again);
DICOM files go through the importer's own ``load_display_frames``, so a study flagged
from its DICOMs sees exactly the display image an annotator saw.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flagger.records import HINT_FIELDS, PreparedImage, PreparedUnit, Problem, WorkUnit
from mammoflag.preprocess import load_display_image, model_input

MANIFEST = "manifest.csv"
REQUIRED_MANIFEST_FIELDS = ("key", "image", "sop_instance_uid", "study_instance_uid", "frame")


class InputError(ValueError):
    """The input as a whole cannot be read (not a folder, manifest without its columns)."""


@dataclass(frozen=True)
class PrepareContext:
    """What a decode process needs besides the unit; sent once per chunk of units."""

    input_size: int
    display_long_side: int
    patient_key_secret: str | None = None  # only DICOM input needs it (patient_key hint)


def input_kind(input_path: Path) -> str:
    """'display' for an import DATA_DIR (it has manifest.csv), 'dicom' for any other folder."""
    if not input_path.is_dir():
        raise InputError(f"{input_path.name}: input must be a folder (an import DATA_DIR or a DICOM folder)")
    return "display" if (input_path / MANIFEST).is_file() else "dicom"


def iter_units(input_path: Path) -> Iterator[WorkUnit]:
    if input_kind(input_path) == "display":
        yield from _iter_manifest_units(input_path)
    else:
        yield from _iter_dicom_units(input_path)


def _iter_manifest_units(data_dir: Path) -> Iterator[WorkUnit]:
    root = data_dir.resolve()
    with open(root / MANIFEST, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_MANIFEST_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{MANIFEST}: missing column(s) {', '.join(missing)}")
        for line_no, row in enumerate(reader, start=2):
            # A row without a key still becomes a unit, so the errors file accounts for it.
            unit_id = row.get("key") or f"{MANIFEST}:line-{line_no}"
            yield WorkUnit(unit_id, "display", str(root / (row.get("image") or "")), dict(row))


def _iter_dicom_units(folder: Path) -> Iterator[WorkUnit]:
    """Every file below the folder, in a stable order; non-DICOM files are accounted for as skipped."""
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            yield WorkUnit(path.relative_to(root).as_posix(), "dicom", str(path))


def count_units(input_path: Path) -> int:
    """A streaming count of the units (for the progress bar's total and ETA)."""
    if input_kind(input_path) == "display":
        with open(input_path / MANIFEST, newline="", encoding="utf-8") as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)
    return sum(len(files) for _, _, files in os.walk(input_path))


def prepare_unit(unit: WorkUnit, ctx: PrepareContext) -> PreparedUnit:
    """Load one unit's display image(s) and turn them into model inputs; problems are returned, not raised."""
    try:
        if unit.kind == "display":
            return _prepare_display(unit, ctx)
        return _prepare_dicom(unit, ctx)
    except Exception as exc:  # one bad file never stops the run
        return PreparedUnit(unit, problem=Problem("failed", _safe_reason(exc, unit.path)))


def prepare_units(units: list[WorkUnit], ctx: PrepareContext) -> list[PreparedUnit]:
    """A chunk of units at once: one round trip to a decode process per chunk."""
    return [prepare_unit(u, ctx) for u in units]


def _prepare_display(unit: WorkUnit, ctx: PrepareContext) -> PreparedUnit:
    row = unit.manifest_row or {}
    for name in REQUIRED_MANIFEST_FIELDS:
        if not (row.get(name) or "").strip():
            return PreparedUnit(unit, problem=Problem("failed", f"{MANIFEST}: empty {name}"))
    image_rel = Path(row["image"])
    if image_rel.is_absolute() or ".." in image_rel.parts:
        # manifest paths are relative to DATA_DIR; anything else could read outside it
        return PreparedUnit(unit, problem=Problem("failed", f"{MANIFEST}: image path leaves the DATA_DIR"))
    try:
        display = load_display_image(unit.path)
    except FileNotFoundError:
        return PreparedUnit(unit, problem=Problem("failed", f"{MANIFEST}: image file is missing"))
    except OSError as exc:
        return PreparedUnit(unit, problem=Problem("failed", f"display image unreadable: {_safe_reason(exc, unit.path)}"))
    try:
        frame = str(int(row["frame"]))
    except ValueError:
        return PreparedUnit(unit, problem=Problem("failed", f"{MANIFEST}: frame {row['frame']!r} is not a number"))
    hints = {name: (row.get(name) or "") for name in HINT_FIELDS}
    hints["frame"] = frame
    return PreparedUnit(unit, [PreparedImage(row["key"], hints, model_input(display, ctx.input_size))])


def _prepare_dicom(unit: WorkUnit, ctx: PrepareContext) -> PreparedUnit:
    # the importer's code, imported here: decode processes import it on first use only
    from importers.dicom import load_display_frames
    from importers.types import ImportProblem, NormalizeOptions

    try:
        loaded = load_display_frames(Path(unit.path), NormalizeOptions(long_side=ctx.display_long_side),
                                     ctx.patient_key_secret)
    except ImportProblem as problem:
        return PreparedUnit(unit, problem=Problem(problem.status, problem.reason))
    hints = {name: _hint_text(loaded.hints.get(name)) for name in HINT_FIELDS if name != "frame"}
    for uid_field, tag in (("sop_instance_uid", "(0008,0018)"), ("study_instance_uid", "(0020,000D)")):
        if not hints[uid_field]:
            return PreparedUnit(unit, problem=Problem("failed", f"no {uid_field} {tag}: cannot key the image"))
    images = [
        PreparedImage(f"{hints['sop_instance_uid']}:{frame.frame}", {**hints, "frame": str(frame.frame)},
                      model_input(frame.pixels, ctx.input_size))
        for frame in loaded.frames
    ]
    if not images:
        return PreparedUnit(unit, problem=Problem("failed", "no frames in pixel data"))
    return PreparedUnit(unit, images)


def _hint_text(value) -> str:
    """Hints as manifest.csv writes them: lists '|'-joined, None empty."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return str(value)


def _safe_reason(exc: BaseException, path: str) -> str:
    """An exception as a reason that never repeats the file's path (it may contain a patient's name)."""
    text = str(exc).replace(path, "<file>").replace(os.path.basename(path), "<file>")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
