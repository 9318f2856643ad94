"""Flagger input: an import DATA_DIR (manifest.csv + display PNGs), a folder of DICOM files, or a DICOMweb archive.

``iter_units`` lists the input as work units, streaming (a million-row manifest or a deep
folder tree is never held in memory). ``prepare_unit`` turns one unit into model inputs;
it runs in decode processes, so it takes and returns plain picklable data.

Display PNGs are reused as the importer wrote them (nothing is decoded from DICOM again);
DICOM files go through the importer's own ``load_display_frames``, so a study flagged
from its DICOMs sees exactly the display image an annotator saw. The manifest format, the
image key and the UID rule are the shared core's (:mod:`mammoflag.datadir`): a row whose
Study or SOP Instance UID is not a UID fails (it would key a row of flags.csv).

A DICOMweb archive (``dicomweb+http(s)://HOST/PATH``, :class:`DicomWebInput`) is listed by QIDO-RS
study by study (streamed); each instance is a unit whose decode process retrieves it by WADO-RS into
a temporary file, normalises it like a DICOM file and removes the file: nothing is copied or kept.
A server that refuses access or stops answering stops the run (raised, not a unit's failure);
the checkpoint keeps what was done and the same command resumes.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flagger.records import HINT_FIELDS, PreparedImage, PreparedUnit, Problem, UnitKind, WorkUnit
from mammoflag.dicomweb import (
    DicomWebAccessError,
    DicomWebAuth,
    DicomWebClient,
    DicomWebQuery,
    DicomWebSource,
    DicomWebUnavailable,
    InstanceRef,
    InstanceUnavailable,
    RetryPolicy,
)
from mammoflag.datadir import (
    MANIFEST_FILE,
    REQUIRED_MANIFEST_COLUMNS,
    ManifestError,
    image_key,
    is_valid_uid,
    iter_manifest_rows,
)
from mammoflag.header_evidence import header_evidence
from mammoflag.preprocess import load_display_image, model_input

MANIFEST = MANIFEST_FILE
REQUIRED_MANIFEST_FIELDS = REQUIRED_MANIFEST_COLUMNS
UID_FIELDS = (("sop_instance_uid", "SOP Instance UID (0008,0018)"),
              ("study_instance_uid", "Study Instance UID (0020,000D)"))


class InputError(ValueError):
    """The input as a whole cannot be read (not a folder, manifest without its columns)."""


@dataclass(frozen=True)
class DicomWebInput:
    """A DICOMweb archive to flag: where, how to authenticate and retry, which instances (picklable)."""

    source: DicomWebSource
    auth: DicomWebAuth = DicomWebAuth()
    retry: RetryPolicy = RetryPolicy()
    query: DicomWebQuery = DicomWebQuery()

    def __str__(self) -> str:
        return str(self.source)

    def client(self) -> DicomWebClient:
        return DicomWebClient(self.source, self.auth, self.retry)


@dataclass(frozen=True)
class PrepareContext:
    """What a decode process needs besides the unit; sent once per chunk of units."""

    input_size: int
    display_long_side: int
    patient_key_secret: str | None = None  # only DICOM input needs it (patient_key hint)
    dicomweb: DicomWebInput | None = None  # DICOMweb input: the archive the units are retrieved from


FlagInput = Path | DicomWebInput


def input_kind(input_path: FlagInput) -> UnitKind:
    """DISPLAY for an import DATA_DIR (it has manifest.csv), DICOMWEB for an archive, DICOM for any other folder."""
    if isinstance(input_path, DicomWebInput):
        return UnitKind.DICOMWEB
    if not input_path.is_dir():
        raise InputError(f"{input_path.name}: input must be a folder (an import DATA_DIR or a DICOM folder)")
    return UnitKind.DISPLAY if (input_path / MANIFEST).is_file() else UnitKind.DICOM


def iter_units(input_path: FlagInput) -> Iterator[WorkUnit]:
    if isinstance(input_path, DicomWebInput):
        yield from _iter_dicomweb_units(input_path)
    elif input_kind(input_path) is UnitKind.DISPLAY:
        yield from _iter_manifest_units(input_path)
    else:
        yield from _iter_dicom_units(input_path)


def _iter_manifest_units(data_dir: Path) -> Iterator[WorkUnit]:
    root = data_dir.resolve()
    try:
        for line_no, row in iter_manifest_rows(root / MANIFEST):
            # A row without a key still becomes a unit, so the errors file accounts for it.
            unit_id = row.get("key") or f"{MANIFEST}:line-{line_no}"
            yield WorkUnit(unit_id, UnitKind.DISPLAY, str(root / (row.get("image") or "")), dict(row))
    except ManifestError as exc:
        raise InputError(str(exc)) from None


# The unit of a folder that cannot be listed ends in "/": its files are unknown, it fails as one.
UNREADABLE_FOLDER_SUFFIX = "/"


def _iter_dicom_units(folder: Path) -> Iterator[WorkUnit]:
    """Every file below the folder, in a stable order; non-DICOM files are accounted for as skipped.

    A subfolder that cannot be listed becomes a unit of its own (its path + "/"), which fails,
    so the errors file accounts for it.
    """
    root = folder.resolve()
    unreadable: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda exc: unreadable.append(exc.filename)):
        dirnames.sort()
        while unreadable:
            bad = Path(unreadable.pop())
            if bad != root and bad.is_relative_to(root):
                yield WorkUnit(bad.relative_to(root).as_posix() + UNREADABLE_FOLDER_SUFFIX, UnitKind.DICOM, str(bad))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            yield WorkUnit(path.relative_to(root).as_posix(), UnitKind.DICOM, str(path))
    while unreadable:
        bad = Path(unreadable.pop())
        if bad != root and bad.is_relative_to(root):
            yield WorkUnit(bad.relative_to(root).as_posix() + UNREADABLE_FOLDER_SUFFIX, UnitKind.DICOM, str(bad))


def _iter_dicomweb_units(archive: DicomWebInput) -> Iterator[WorkUnit]:
    """Every matching instance, study by study, in the listing's order (a study's instances together)."""
    for ref in archive.client().iter_instances(archive.query):
        yield WorkUnit(ref.path, UnitKind.DICOMWEB, archive.source.url_of(ref))


def study_of_unit(unit: WorkUnit) -> str | None:
    """The Study Instance UID a DICOMweb unit belongs to (shards never split a study), else None."""
    if unit.kind is not UnitKind.DICOMWEB:
        return None
    try:
        return InstanceRef.from_path(unit.unit_id).study_uid
    except ValueError:
        return None


def count_units(input_path: FlagInput) -> int:
    """A streaming count of the units (for the progress bar's total and ETA); 0 for a DICOMweb archive
    (unknown until listed: counting would list the archive twice)."""
    if isinstance(input_path, DicomWebInput):
        return 0
    if input_kind(input_path) is UnitKind.DISPLAY:
        with open(input_path / MANIFEST, newline="", encoding="utf-8") as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)
    return sum(len(files) for _, _, files in os.walk(input_path))


def prepare_unit(unit: WorkUnit, ctx: PrepareContext) -> PreparedUnit:
    """Load one unit's display image(s) and turn them into model inputs; problems are returned, not raised."""
    try:
        if unit.kind is UnitKind.DISPLAY:
            return _prepare_display(unit, ctx)
        if unit.kind is UnitKind.DICOMWEB:
            return _prepare_dicomweb(unit, ctx)
        return _prepare_dicom(unit, ctx)
    except (DicomWebAccessError, DicomWebUnavailable):
        raise  # the archive, not this unit: the run stops and resumes later
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
        return PreparedUnit(unit, problem=Problem("failed", f"{MANIFEST}: frame is not a number"))
    problem = _uid_problem(row, f"{MANIFEST}: ")
    if problem:
        return PreparedUnit(unit, problem=problem)
    if row["key"] != image_key(row["sop_instance_uid"], frame):
        return PreparedUnit(unit, problem=Problem("failed", f"{MANIFEST}: key is not <sop_instance_uid>:<frame>"))
    hints = {name: (row.get(name) or "") for name in HINT_FIELDS}
    hints["frame"] = frame
    return PreparedUnit(unit, [PreparedImage(row["key"], hints, model_input(display, ctx.input_size),
                                             header_evidence(row))])


def _uid_problem(hints: dict[str, str], prefix: str = "") -> Problem | None:
    """A failure when the SOP or Study Instance UID is missing or not a UID (it keys the image and its study)."""
    for name, field_name in UID_FIELDS:
        value = hints.get(name) or ""
        if not value:
            return Problem("failed", f"{prefix}no {field_name}: cannot key the image")
        if not is_valid_uid(value):
            return Problem("failed", f"{prefix}{field_name} is not a valid UID (digits and dots, at most 64 "
                                     "characters)")
    return None


def _prepare_dicom(unit: WorkUnit, ctx: PrepareContext) -> PreparedUnit:
    # the importer's code, imported here: decode processes import it on first use only
    from mammoflag.dicom.normalize import load_display_frames
    from mammoflag.dicom.types import ImportProblem, NormalizeOptions

    if unit.unit_id.endswith(UNREADABLE_FOLDER_SUFFIX):
        return PreparedUnit(unit, problem=Problem("failed", "folder cannot be listed: its files were not flagged"))
    try:
        loaded = load_display_frames(Path(unit.path), NormalizeOptions(long_side=ctx.display_long_side),
                                     ctx.patient_key_secret)
    except ImportProblem as problem:
        return PreparedUnit(unit, problem=Problem(problem.status, problem.reason))
    hints = loaded.hints
    problem = _uid_problem({"sop_instance_uid": hints.sop_instance_uid,
                            "study_instance_uid": hints.study_instance_uid})
    if problem:
        return PreparedUnit(unit, problem=problem)
    header = header_evidence(hints.as_dict())
    images = [
        PreparedImage(image_key(hints.sop_instance_uid, frame.frame), hints.text_fields(frame.frame),
                      model_input(frame.pixels, ctx.input_size), header)
        for frame in loaded.frames
    ]
    if not images:
        return PreparedUnit(unit, problem=Problem("failed", "no frames in pixel data"))
    return PreparedUnit(unit, images)


_clients: dict[DicomWebInput, DicomWebClient] = {}  # one HTTP session per archive per process


def _prepare_dicomweb(unit: WorkUnit, ctx: PrepareContext) -> PreparedUnit:
    """Retrieve the instance into a temporary file, normalise it as a DICOM file, remove the file."""
    import tempfile

    if ctx.dicomweb is None:
        raise RuntimeError("a DICOMweb unit needs the archive in the PrepareContext")
    try:
        ref = InstanceRef.from_path(unit.unit_id)
    except ValueError:
        return PreparedUnit(unit, problem=Problem("failed", "not a DICOMweb instance path"))
    client = _clients.get(ctx.dicomweb)
    if client is None:
        client = _clients[ctx.dicomweb] = ctx.dicomweb.client()
    with tempfile.TemporaryDirectory(prefix="mammoflag-wado-") as tmp:
        path = Path(tmp) / "instance.dcm"
        try:
            client.retrieve_to_file(ref, path)
        except InstanceUnavailable as exc:
            return PreparedUnit(unit, problem=Problem("failed", str(exc)))
        prepared = _prepare_dicom(WorkUnit(unit.unit_id, UnitKind.DICOM, str(path)), ctx)
    return PreparedUnit(unit, prepared.images, prepared.problem)


def _safe_reason(exc: BaseException, path: str) -> str:
    """An exception as a reason that never repeats the file's path (it may contain a patient's name)."""
    text = str(exc).replace(path, "<file>").replace(os.path.basename(path), "<file>")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
