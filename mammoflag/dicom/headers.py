"""Header hints: what a DICOM header says about an image, minus anything that identifies the patient.

The hints go into the manifest and the Label Studio task as cross-checks for annotators
and reviewers (a Magnification view modifier, a PREFIRE image type ...). They are never
labels. Patient name, birth date, patient ID and accession number are never returned; the
patient is represented only by ``patient_key``, a keyed hash (HMAC-SHA256 with the
patient-key secret) that lets training split by patient without knowing who it is.

Free text copied from the header (Manufacturer, Model, View Position, Image Type, view
modifier meanings ...) passes :func:`mammoflag.datadir.clean_header_text`: length-limited,
no control characters, never a spreadsheet formula. UIDs are copied as they are and
validated by the caller (:func:`mammoflag.datadir.is_valid_uid`).

See docs/CONTRACTS.md, "Header hints"; the type is :class:`mammoflag.datadir.HeaderHints`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mammoflag.datadir import IMPLANT_DISPLACED, MAGNIFICATION, SPOT_COMPRESSION, HeaderHints, clean_header_text

# View Modifier codes that matter for mammoflag. Mammography headers use SNOMED CT codes
# (scheme SCT) in newer files and the older SNOMED RT "R-" codes (scheme SRT / SNM3) in
# older ones; both spellings name the same modifier.
VIEW_MODIFIER_CODES: dict[str, str] = {
    "399163009": MAGNIFICATION,
    "R-102D6": MAGNIFICATION,
    "399055006": SPOT_COMPRESSION,
    "R-102D7": SPOT_COMPRESSION,
    "399209000": IMPLANT_DISPLACED,
    "R-102D5": IMPLANT_DISPLACED,
}

PATIENT_KEY_HEX_CHARS = 32
# A header may carry any number of view modifiers / Image Type values; hints keep the first few.
MAX_LIST_VALUES = 16


def text(ds: Dataset, keyword: str) -> str:
    """A single-valued string element as clean text ('' when absent or empty).

    Vendors pad with spaces and sometimes NULs; multi-valued elements give their first value.
    """
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else ""
    return str(value).strip(" \x00")


def text_list(ds: Dataset, keyword: str) -> list[str]:
    """A multi-valued string element (Image Type ...) as a list of clean strings."""
    value = ds.get(keyword)
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip(" \x00") for v in values]


def patient_key(patient_id: str, secret: str | None) -> str:
    """Keyed hash of the Patient ID: stable for one secret, meaningless without it.

    '' when the file has no Patient ID or no secret was given (the caller decides whether a
    missing secret is an error; the import command reads it from settings, which insists).
    """
    if not patient_id or not secret:
        return ""
    digest = hmac.new(secret.encode("utf-8"), patient_id.encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:PATIENT_KEY_HEX_CHARS]


def _modifier_name(code_item: Dataset) -> str:
    """Name one View Modifier Code Sequence item: a known code, else its meaning, else the raw code."""
    value = text(code_item, "CodeValue") or text(code_item, "LongCodeValue") or text(code_item, "URNCodeValue")
    if value in VIEW_MODIFIER_CODES:
        return VIEW_MODIFIER_CODES[value]
    meaning = text(code_item, "CodeMeaning").lower()
    # EMBED and others key on the Code Meaning: "Magnification", "Spot Compression", ...
    if "magnif" in meaning:
        return MAGNIFICATION
    if "spot" in meaning and "compress" in meaning:
        return SPOT_COMPRESSION
    if meaning:
        return clean_header_text(re.sub(r"[^a-z0-9]+", "_", meaning).strip("_"))
    scheme = text(code_item, "CodingSchemeDesignator")
    # an unknown code is kept as its scheme and value, both free text from the header
    return clean_header_text(f"code:{scheme}:{value}") if value else ""


def view_modifiers(ds: Dataset) -> list[str]:
    """View Modifier codes, in header order, without duplicates.

    The standard nests the View Modifier Code Sequence (0054,0222) inside the View Code
    Sequence (0054,0220); some vendors also (or only) put it at the top level of the
    dataset, so both places are read.
    """
    items: list[Dataset] = []
    for view_item in ds.get("ViewCodeSequence") or []:
        items.extend(view_item.get("ViewModifierCodeSequence") or [])
    items.extend(ds.get("ViewModifierCodeSequence") or [])
    names: list[str] = []
    for item in items:
        name = _modifier_name(item)
        if name and name not in names:
            names.append(name)
        if len(names) >= MAX_LIST_VALUES:
            break
    return names


def laterality(ds: Dataset) -> str:
    """Image Laterality (0020,0062), falling back to the series-level Laterality (0020,0060)."""
    return text(ds, "ImageLaterality") or text(ds, "Laterality")


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (0028,0008); absent, empty or nonsense means one frame."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _int_or_zero(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def header_hints(ds: Dataset, patient_key_secret: str | None) -> HeaderHints:
    """The contract's header hints for one file, except ``voi`` (the pixel core adds that).

    Nothing here is a direct identifier: no name, birth date, Patient ID, accession number
    or path. Only UIDs, acquisition/view descriptors and the keyed patient hash.
    """
    image_type = tuple(clean_header_text(v) for v in text_list(ds, "ImageType")[:MAX_LIST_VALUES])
    return HeaderHints(
        sop_instance_uid=text(ds, "SOPInstanceUID"),
        study_instance_uid=text(ds, "StudyInstanceUID"),
        series_instance_uid=text(ds, "SeriesInstanceUID"),
        patient_key=patient_key(text(ds, "PatientID"), patient_key_secret),
        view_position=clean_header_text(text(ds, "ViewPosition")),
        laterality=clean_header_text(laterality(ds)),
        view_modifiers=tuple(view_modifiers(ds)),
        image_type=image_type,
        # Value 3 of Image Type names stereotactic / tomosynthesis biopsy images
        # (STEREO_SCOUT, PREFIRE, POSTFIRE, POSTMARKER ...).
        image_type_3=image_type[2] if len(image_type) > 2 else "",
        presentation_intent=clean_header_text(text(ds, "PresentationIntentType")),
        manufacturer=clean_header_text(text(ds, "Manufacturer")),
        model=clean_header_text(text(ds, "ManufacturerModelName")),
        burned_in_annotation=clean_header_text(text(ds, "BurnedInAnnotation")),
        rows=_int_or_zero(ds, "Rows"),
        cols=_int_or_zero(ds, "Columns"),
        number_of_frames=number_of_frames(ds),
        magnification_factor=magnification_factor_text(ds),
        partial_view=clean_header_text(text(ds, "PartialView")),
    )


def magnification_factor_text(ds: Dataset) -> str:
    """Estimated Radiographic Magnification Factor (0018,1114), a DS, as plain text ('' when absent or not a number).

    Type 3 in the DX/MG modules: many writers leave it out, and contact views carry ~1.05-1.15 too
    (the breast lies above the detector), so it is evidence, never a label
    (``mammoflag.header_evidence``). A value pydicom cannot read as a number is dropped, not an error."""
    try:
        value = ds.get("EstimatedRadiographicMagnificationFactor")
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
        return "" if value in (None, "") else f"{float(value):g}"
    except (TypeError, ValueError, OverflowError):
        return ""
