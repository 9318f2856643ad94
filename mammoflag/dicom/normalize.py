"""One DICOM file in, 8-bit display frames and header hints out.

``load_display_frames(path, options, patient_key_secret)`` is the pure per-file core of the
importer. It follows the DICOM greyscale display chain (PS3.4 N.2.1.1):

    stored value --(Pixel Padding?)--> Modality LUT / Rescale --> VOI LUT or Window
                 --> MONOCHROME1 / Presentation LUT Shape INVERSE (inverted once) --> 0..255

then resizes the whole field of view (no cropping, aspect kept) with an area (box) filter so
the long side is at most ``options.long_side``.

Every step of the chain is pointwise: a display grey level depends only on the stored
value. The fast path (default) therefore evaluates the chain once per possible stored
value, builds a 256- or 65,536-entry uint8 lookup table indexed by the raw pixel words,
applies it to the frame and box-reduces the 8-bit result. The table also does the Bits
Stored work (high bits masked, signed values sign-extended) and the padding mask, so
uncompressed pixel words go from the file to the table without a copy (a large Pixel Data
value is not even read: pydicom defers it and the file is mapped into memory).
``options.exact=True`` runs the float64 reference instead: the chain at full resolution on
pydicom's decoded values, then a float area resize, rounded once at the end.

Files without a VOI (FOR PROCESSING raw detector data, some CR/CT) get a documented
fallback window: the 0.5th to 99.5th percentile of the non-padding values after the
Modality LUT, sampled on every 4th row and column (both paths use the same sample), mapped
linearly. The hint ``voi`` records what was used ("window:LINEAR", "lut",
"fallback:for-processing", "fallback:no-voi" ...), and a note of the same name is added so
the import report can mark such images.

JPEG 2000 frames that the display downsizes by 4x or more are decoded at reduced
resolution (the codestream's own wavelet levels, via Pillow's ``reduce``, keeping one level
above the display size), which skips most of the decoding work; the note ``j2k:reduced``
says so. Everything else decodes through pydicom 3's ``pydicom.pixels`` and its plugins
(pylibjpeg-openjpeg, -libjpeg, -rle, pyjpegls).

Enhanced multi-frame objects (Enhanced MG, Breast Tomosynthesis) keep window and rescale
in shared / per-frame functional groups; each frame gets its own chain from them.

Outcomes other than "imported" are exceptions: :class:`SkipFile` (not DICOM, no pixel
data, colour ...) and :class:`FailFile` (truncated, undecodable, inconsistent header). Their
reasons name the problem and the DICOM keyword/tag, never the file path or an identifier.

The pieces live one concern per module, as pydicom splits ``pixels/processing.py`` from its
codecs: :mod:`mammoflag.dicom.decode` (pixel words out of each transfer syntax, JPEG 2000 reduced),
:mod:`mammoflag.dicom.display` (the display chain) and :mod:`mammoflag.dicom.render` (resize, one frame).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from mammoflag.dicom.decode import (
    PixelFormat,
    check_decode_size,
    check_encapsulated_frame,
    check_native_length,
    native_frame_bytes,
    transfer_syntax,
)
from mammoflag.dicom.display import display_chain, frame_view, has_functional_group_values
from mammoflag.dicom.headers import header_hints, number_of_frames, text
from mammoflag.dicom.render import area_resize, area_resize_u8, display_size, render_exact, render_fast
from mammoflag.dicom.types import DicomImages, DisplayFrame, FailFile, NormalizeOptions, SkipFile
from mammoflag.datadir import HeaderHints, is_valid_uid

__all__ = ["load_display_frames", "read_dataset", "check_greyscale_image", "area_resize", "area_resize_u8",
           "display_size"]


# --------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------


def _looks_like_dataset(ds: Dataset) -> bool:
    """A forced read of any file yields *something*; a real DICOM dataset has image or SOP tags."""
    try:
        return any(keyword in ds for keyword in ("SOPClassUID", "PixelData", "Rows", "StudyInstanceUID"))
    except Exception:
        return False


# Values larger than this are not read with the header: pydicom reads them when first used, and
# an uncompressed Pixel Data value is mapped from the file instead (decode.mapped_pixel_data).
# Large enough that nothing but pixel data (and the odd private blob) is deferred.
DEFER_READ_BYTES = 1 << 20


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file, accepting files without the 128-byte preamble and 'DICM' prefix.

    Old ACR-NEMA style files and some exports are a bare dataset with no File Meta
    Information; pydicom reads them with ``force=True``, guessing implicit/explicit VR from
    the first element. A forced read of a non-DICOM file gives garbage or fails, so it only
    counts when image or SOP tags came out of it. Values above DEFER_READ_BYTES are left in
    the file until used.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_READ_BYTES)
    except InvalidDicomError:
        pass  # no 'DICM' prefix: maybe a bare dataset, tried below
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise FailFile(f"cannot open file ({type(exc).__name__})") from None
    except Exception as exc:  # a DICM prefix, then a header that does not parse
        raise FailFile(f"DICOM header unreadable (truncated or corrupt: {type(exc).__name__})") from None
    else:
        if len(ds) == 0:
            # pydicom stops quietly when the data set after the File Meta cannot be parsed
            raise FailFile("File Meta Information but no readable data set after it (truncated or corrupt)")
        return ds

    try:
        ds = pydicom.dcmread(path, force=True, defer_size=DEFER_READ_BYTES)
    except Exception:
        raise SkipFile("not a DICOM file (no 'DICM' prefix and no readable DICOM data elements)") from None
    if not _looks_like_dataset(ds):
        raise SkipFile("not a DICOM file (no 'DICM' prefix and no readable DICOM data elements)")
    return ds


def _sop_class_name(ds: Dataset) -> str:
    """The SOP class's name for reasons ("Basic Text SR Storage", "RT Plan Storage" ...)."""
    # DICOMDIRs and some exports name their SOP class only in the File Meta
    sop_class = text(ds, "SOPClassUID") or text(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    if not sop_class:
        return "no SOP Class UID"
    name = dicom_uid.UID(sop_class).name
    # pydicom's dictionary names a registered UID; anything else is free text from the header,
    # which a reason never quotes
    return name if name != sop_class else "an unregistered SOP Class UID (0008,0016)"


def _ensure_transfer_syntax(ds: Dataset, notes: list[str]) -> None:
    """Make sure the file meta names a Transfer Syntax, or fail saying why we cannot.

    Files without (0002,0010) Transfer Syntax UID were read with the encoding pydicom
    guessed from the data elements. When the Pixel Data is native (defined length, exactly
    the size Rows x Columns x Frames x Bits Allocated needs), that guess also describes the
    pixels and we can go on with it. Encapsulated (compressed) Pixel Data does not say
    which codec made it, so such a file fails.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    element = ds["PixelData"]
    if not all(keyword in ds for keyword in ("Rows", "Columns", "BitsAllocated")):
        raise FailFile("missing Transfer Syntax UID (0002,0010) and no Rows / Columns / Bits Allocated "
                       "to check the Pixel Data (7FE0,0010) against")
    if element.is_undefined_length:
        raise FailFile("missing Transfer Syntax UID (0002,0010) and the Pixel Data (7FE0,0010) is "
                       "encapsulated (compressed): cannot tell the codec")
    expected = native_frame_bytes(ds) * number_of_frames(ds)
    if len(element.value or b"") not in (expected, expected + 1):
        raise FailFile("missing Transfer Syntax UID (0002,0010) and the Pixel Data (7FE0,0010) length "
                       "does not match uncompressed Rows x Columns x Bits Allocated")
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None or little_endian is None:
        implicit_vr, little_endian = True, True  # pydicom's own default for headerless data
    if implicit_vr and little_endian:
        syntax = dicom_uid.ImplicitVRLittleEndian
    elif little_endian:
        syntax = dicom_uid.ExplicitVRLittleEndian
    else:
        syntax = dicom_uid.ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    notes.append(f"transfer-syntax-missing:assumed {syntax.name}")


# --------------------------------------------------------------------------------------
# Checking that this is a greyscale image we import
# --------------------------------------------------------------------------------------


def _int_field(ds: Dataset, keyword: str, tag: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise FailFile(f"missing {keyword} {tag}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FailFile(f"{keyword} {tag} is not an integer") from None


# The defined terms of Photometric Interpretation (PS3.3 C.7.6.3.1.2): a reason may name these;
# any other value is free text from the header and is not quoted.
STANDARD_PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
                         "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}


def _small_int(value: int) -> str:
    return str(value) if 0 <= value <= 64 else "out of range"


def check_greyscale_image(ds: Dataset) -> PixelFormat:
    """Skip what is not a greyscale image; fail what claims to be one but is inconsistent."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise SkipFile(f"float pixel data is not a display image ({_sop_class_name(ds)})")
        raise SkipFile(f"no Pixel Data (7FE0,0010): {_sop_class_name(ds)}")
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = text(ds, "PhotometricInterpretation").upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if photometric in ("", ) and samples == 1:
            raise FailFile("missing Photometric Interpretation (0028,0004)")
        shown = photometric if photometric in STANDARD_PHOTOMETRICS else "a non-standard value"
        raise SkipFile(f"colour image (Photometric Interpretation (0028,0004) {shown}, "
                       f"Samples per Pixel (0028,0002) {_small_int(samples)}): only greyscale is imported")
    rows = _int_field(ds, "Rows", "(0028,0010)")
    cols = _int_field(ds, "Columns", "(0028,0011)")
    bits_allocated = _int_field(ds, "BitsAllocated", "(0028,0100)")
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    if rows < 1 or cols < 1:
        raise FailFile(f"empty image: Rows (0028,0010) {rows}, Columns (0028,0011) {cols}")
    if bits_allocated == 1:
        raise SkipFile("1-bit pixel data (Bits Allocated (0028,0100) 1) is a mask, not a display image")
    if bits_allocated not in (8, 16, 32):
        raise FailFile(f"unsupported Bits Allocated (0028,0100) {bits_allocated}")
    if not 1 <= bits_stored <= bits_allocated:
        raise FailFile(f"Bits Stored (0028,0101) {bits_stored} does not fit Bits Allocated (0028,0100) "
                       f"{bits_allocated}")
    if not text(ds, "SOPInstanceUID"):
        raise FailFile("missing SOP Instance UID (0008,0018): no key to import the image under")
    return PixelFormat(rows, cols, bits_allocated, bits_stored, int(ds.get("PixelRepresentation") or 0) == 1)


def quiet_pydicom() -> None:
    """Keep pydicom's own log lines out of every log: they quote header values.

    pydicom logs (and warns) what it finds odd with the value itself ("Invalid value for VR UI:
    '=cmd|...'", a patient's name in a bad PN). Warnings are suppressed around each read; its
    logger is silenced here, once per process. Reasons name fields, never their values.
    """
    logger = logging.getLogger("pydicom")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False


def load_display_frames(path: str | Path, options: NormalizeOptions = NormalizeOptions(),
                        patient_key_secret: str | None = None) -> DicomImages:
    """Read one DICOM file and return its header hints and one 8-bit display image per frame.

    Raises SkipFile (not an image mammoflag imports) or FailFile (an image that cannot be
    imported); both have a ``reason`` safe to store and log. Any other exception would be a
    bug in this function, never the file's fault.
    """
    path = Path(path)
    quiet_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(path)
            return _load(ds, options, patient_key_secret)
    except (SkipFile, FailFile):
        raise
    except MemoryError:
        raise FailFile("image too large to decode in memory") from None
    except Exception as exc:  # a header pydicom read but whose values are nonsense
        raise FailFile(f"inconsistent DICOM header or pixel data ({type(exc).__name__})") from None


UID_FIELDS = (("sop_instance_uid", "SOP Instance UID (0008,0018)"),
              ("study_instance_uid", "Study Instance UID (0020,000D)"),
              ("series_instance_uid", "Series Instance UID (0020,000E)"))


def check_uids(hints: HeaderHints) -> None:
    """Every UID the image is keyed and grouped by must be a UID (digits and dots, <= 64 chars).

    The SOP Instance UID names the image's folder and key; Study and Series Instance UIDs key
    rows of flags.csv and the manifest. A value like ``=cmd|' /C calc'!A0`` or ``../..`` is
    refused here, before any of them is written. The SOP Instance UID is required; a missing
    Study or Series Instance UID stays empty (the flagger refuses an image without a study).
    """
    for name, field_name in UID_FIELDS:
        value = getattr(hints, name)
        if name == "sop_instance_uid" and not value:
            raise FailFile(f"missing {field_name}: no key to import the image under")
        if value and not is_valid_uid(value):
            raise FailFile(f"{field_name} is not a valid UID (digits and dots, at most 64 characters)")


def _load(ds: Dataset, options: NormalizeOptions, patient_key_secret: str | None) -> DicomImages:
    notes: list[str] = []
    if "PixelData" in ds:
        _ensure_transfer_syntax(ds, notes)
    fmt = check_greyscale_image(ds)
    check_decode_size(ds, fmt, options)  # before anything allocates pixels
    check_native_length(ds, fmt)
    encapsulated = transfer_syntax(ds).is_encapsulated
    hints = header_hints(ds, patient_key_secret)
    check_uids(hints)
    size = display_size(fmt.rows, fmt.cols, options.long_side)
    enhanced = has_functional_group_values(ds)
    chain = display_chain(frame_view(ds, 0) if enhanced else ds, fmt, options)
    hints = hints.with_voi(chain.voi)
    frames = []
    for frame in range(hints.number_of_frames):
        if enhanced and frame > 0:
            chain = display_chain(frame_view(ds, frame), fmt, options)
        notes.extend(n for n in chain.notes if n not in notes)
        if encapsulated:
            check_encapsulated_frame(ds, fmt, frame)
        if options.exact:
            pixels = render_exact(ds, chain, frame, size)
        else:
            pixels = render_fast(ds, fmt, chain, frame, size, options, notes)
        frames.append(DisplayFrame(frame=frame, pixels=pixels))
    return DicomImages(hints=hints, frames=frames, notes=notes)
