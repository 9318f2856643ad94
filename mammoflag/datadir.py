"""The import DATA_DIR format, defined once: header hints, manifest.csv, the image key, UIDs.

The importer writes a DATA_DIR, training and the flagger read it (docs/CONTRACTS.md "Import
DATA_DIR"). Everything both sides must agree on lives here, in the shared core, which imports
no stage:

- :class:`HeaderHints`: what a DICOM header says about an image (typed, frozen), and how it
  becomes a manifest row / comes back from one;
- ``MANIFEST_COLUMNS`` and :func:`read_manifest` (streaming, one row per key);
- :func:`image_key`: ``<sop_instance_uid>:<frame>``, the dedupe key everywhere;
- :func:`is_valid_uid`: the UID rule every UID that names a folder or keys a row must pass;
- :func:`clean_header_text`: header free text as it may be copied into hints (length-limited,
  no control characters, never a spreadsheet formula).
"""

from __future__ import annotations

import csv
import re
import sqlite3
import tempfile
import unicodedata
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from mammoflag.fileio import safe_cell

IMAGES_DIR = "images"
MANIFEST_FILE = "manifest.csv"
TASKS_FILE = "tasks.json"
REPORT_FILE = "import_report.csv"

REPORT_COLUMNS = ("path", "status", "reason", "sop_instance_uid", "study_instance_uid", "frames", "notes")
MANIFEST_COLUMNS = ("key", "image", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame",
                    "patient_key", "view_position", "laterality", "view_modifiers", "image_type",
                    "presentation_intent", "manufacturer", "model", "burned_in_annotation", "voi", "rows", "cols",
                    "magnification_factor", "partial_view")
LIST_COLUMNS = ("view_modifiers", "image_type")  # '|'-joined in manifest.csv, JSON lists in tasks
INT_COLUMNS = ("frame", "rows", "cols")
LIST_SEPARATOR = "|"

# The per-image hint fields the flagger keeps (checkpoint columns, images.csv), in that order.
FLAGGER_HINT_FIELDS: tuple[str, ...] = (
    "study_instance_uid", "sop_instance_uid", "frame", "series_instance_uid", "patient_key", "view_position",
    "laterality", "view_modifiers", "image_type", "presentation_intent", "manufacturer", "model",
)

# View modifier names the importer normalises View Modifier codes and meanings to (mammoflag/dicom/headers.py).
MAGNIFICATION = "magnification"
SPOT_COMPRESSION = "spot_compression"
IMPLANT_DISPLACED = "implant_displaced"

# A DICOM UID (PS3.5 9.1): digits in dot-separated components, at most 64 characters. A SOP
# Instance UID names a folder under images/ and every UID keys rows in CSV files, so anything
# else ("../..", "=cmd|...") must never get that far.
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_CHARS = 64
# Free text copied from a header into hints: LO is 64 characters; a little slack for CS lists.
HINT_TEXT_MAX_CHARS = 64


def is_valid_uid(value: str) -> bool:
    return len(value) <= UID_MAX_CHARS and bool(UID_PATTERN.match(value))


def image_key(sop_instance_uid: str, frame: int | str) -> str:
    """``<sop_instance_uid>:<frame>``: one display image, the key of manifest rows, tasks and flags."""
    return f"{sop_instance_uid}:{frame}"


def clean_header_text(value: Any, max_chars: int = HINT_TEXT_MAX_CHARS) -> str:
    """Header free text made safe to copy anywhere (tasks, CSV files, logs of counts).

    Control characters (C0, C1, DEL; a vendor's NUL padding, an attacker's CR/LF/TAB) become
    spaces, runs of space collapse, the text is cut to ``max_chars`` and one that a spreadsheet
    would run as a formula (``= + - @``) gets a leading quote (OWASP's rule, as every CSV cell).
    """
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in str(value))
    text = " ".join(text.split())[:max_chars].strip()
    return safe_cell(text)


@dataclass(frozen=True)
class HeaderHints:
    """What a DICOM header says about an image, minus anything that identifies the patient.

    See docs/CONTRACTS.md "Header hints". ``voi`` is filled in by the display chain.
    """

    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_key: str = ""  # HMAC of PatientID with the patient-key secret; "" when absent
    view_position: str = ""
    laterality: str = ""
    view_modifiers: tuple[str, ...] = ()  # normalised names ("magnification", "spot_compression" ...)
    image_type: tuple[str, ...] = ()
    image_type_3: str = ""
    presentation_intent: str = ""
    manufacturer: str = ""
    model: str = ""
    burned_in_annotation: str = ""
    voi: str = ""
    rows: int = 0
    cols: int = 0
    number_of_frames: int = 1
    magnification_factor: str = ""  # Estimated Radiographic Magnification Factor (0018,1114) as written
    partial_view: str = ""  # Partial View (0028,1350): YES / NO

    def with_voi(self, voi: str) -> "HeaderHints":
        return replace(self, voi=voi)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists for the list fields): for JSON and for pickling to processes."""
        d = asdict(self)
        for name in LIST_COLUMNS:
            d[name] = list(d[name])
        return d

    def manifest_row(self, frame: int, image: Path | str) -> dict[str, Any]:
        """The manifest.csv row of one frame; lists are '|'-joined, every cell spreadsheet-safe."""
        values = self.as_dict()
        row: dict[str, Any] = {}
        for column in MANIFEST_COLUMNS:
            value = values.get(column, "")
            if isinstance(value, list):
                value = LIST_SEPARATOR.join(str(v) for v in value)
            row[column] = safe_cell(value)
        row["key"] = image_key(self.sop_instance_uid, frame)
        row["image"] = Path(image).as_posix()
        row["frame"] = frame
        return row

    def text_fields(self, frame: int | str) -> dict[str, str]:
        """The flagger's hints of one frame (``FLAGGER_HINT_FIELDS``) as manifest.csv writes them."""
        values = self.as_dict()
        out = {}
        for name in FLAGGER_HINT_FIELDS:
            value = values.get(name, "")
            out[name] = LIST_SEPARATOR.join(value) if isinstance(value, list) else str(value)
        out["frame"] = str(frame)
        return out

    @classmethod
    def from_manifest_row(cls, row: Mapping[str, str]) -> "HeaderHints":
        """A manifest.csv row back as hints (missing columns stay at their defaults)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in row or row[f.name] is None:
                continue
            value = row[f.name]
            if f.name in LIST_COLUMNS:
                kwargs[f.name] = tuple(v for v in value.split(LIST_SEPARATOR) if v)
            elif f.name in ("rows", "cols", "number_of_frames"):
                kwargs[f.name] = int(value) if str(value).strip().isdigit() else 0
            else:
                kwargs[f.name] = str(value)
        return cls(**kwargs)


def header_flags(view_modifiers: str | tuple[str, ...], image_type_3: str) -> tuple[bool, bool, bool]:
    """What the header alone says: (magnification view, spot compression, biopsy-procedure image).

    View modifiers arrive normalised by the importer (``MAGNIFICATION`` ...), so they are
    compared as names, never re-derived from codes. Image Type value 3 marks stereotactic and
    tomosynthesis-guided biopsy images; stereotactic systems add a suffix (PREFIRE_1, POSTFIRE_2).
    """
    if isinstance(view_modifiers, str):
        view_modifiers = tuple(v.strip() for v in view_modifiers.split(LIST_SEPARATOR) if v.strip())
    value_3 = image_type_3.strip().upper()
    biopsy = any(value_3 == t or value_3.startswith(t + "_") for t in BIOPSY_IMAGE_TYPES)
    return MAGNIFICATION in view_modifiers, SPOT_COMPRESSION in view_modifiers, biopsy


# Image Type (0008,0008) value 3 of stereotactic and tomosynthesis-guided biopsy images.
BIOPSY_IMAGE_TYPES = ("STEREO_SCOUT", "TOMO_SCOUT", "PREFIRE", "POSTFIRE", "POSTBIOPSY", "POSTMARKER")


def image_type_3(image_type: str | tuple[str, ...]) -> str:
    values = image_type.split(LIST_SEPARATOR) if isinstance(image_type, str) else list(image_type)
    return values[2] if len(values) > 2 else ""


class ManifestError(ValueError):
    """A manifest.csv that lacks the columns every reader needs."""


REQUIRED_MANIFEST_COLUMNS = ("key", "image", "sop_instance_uid", "study_instance_uid", "frame")


def manifest_fieldnames(path: Path) -> tuple[str, ...]:
    """The columns rows appended to an existing manifest.csv must have: its own header's.

    A DATA_DIR imported by an older release lacks the newer columns (``magnification_factor`` ...);
    a resumed import appends rows in the file's own layout rather than a ragged one, and readers
    see the missing columns as absent (the image model's answer, no header evidence)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except FileNotFoundError:
        header = None
    return tuple(header) if header else MANIFEST_COLUMNS


def iter_manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of every manifest.csv row, streaming, as written (no dedupe)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{MANIFEST_FILE}: missing column(s) {', '.join(missing)}")
        for line_no, row in enumerate(reader, start=2):
            yield line_no, row


def read_manifest(path: Path) -> Iterator[dict[str, str]]:
    """manifest.csv rows (strings), streaming; a row without a key, or whose key was seen before, is left out.

    The keys seen go to a throwaway SQLite file in the temporary folder, not a Python set, so a
    manifest of millions of rows is read in flat memory (and a read-only DATA_DIR is fine)."""
    with tempfile.TemporaryDirectory(prefix="mammoflag-manifest-") as tmp:
        seen = sqlite3.connect(Path(tmp) / "seen.sqlite", isolation_level=None)
        try:
            seen.execute("PRAGMA journal_mode=OFF")
            seen.execute("PRAGMA synchronous=OFF")
            seen.execute("CREATE TABLE seen (key TEXT PRIMARY KEY) WITHOUT ROWID")
            seen.execute("BEGIN")  # one transaction: nothing here needs to survive
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if row.get("key") and seen.execute("INSERT OR IGNORE INTO seen VALUES (?)",
                                                       (row["key"],)).rowcount == 1:
                        yield row
        finally:
            seen.close()


def study_label(study_uid: str) -> str:
    """A short, stable name for a study in the annotator's header (a hash: the UID itself is long)."""
    import hashlib

    return hashlib.sha256(study_uid.encode()).hexdigest()[:8] if study_uid else ""


def task_data_for_row(row: Mapping[str, str], data_dir: Path, data_root: Path) -> dict[str, Any]:
    """A Label Studio task's ``data`` for one manifest row (docs/CONTRACTS.md "Task data keys").

    The same as the importer's ``importers.run.task_data`` (a test holds them equal), here in the
    core so the labeling pool (ml_backend) can make tasks from archive rows without the importer.
    """
    from mammoflag.paths import task_url_for

    data: dict[str, Any] = {}
    for column in MANIFEST_COLUMNS:
        value: Any = row.get(column, "") or ""
        if column in LIST_COLUMNS:
            value = [v for v in value.split(LIST_SEPARATOR) if v]
        elif column in INT_COLUMNS:
            value = int(value) if str(value).strip() else None
        data[column] = value
    data["image"] = task_url_for(Path(data_dir) / row["image"], data_root)
    data["study_label"] = study_label(row.get("study_instance_uid", "") or "")
    return data
