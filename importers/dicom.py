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
uncompressed pixel words go from the file buffer to the table without a copy.
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
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

from importers.headers import header_hints, number_of_frames, text
from importers.types import DicomImages, DisplayFrame, FailFile, NormalizeOptions, SkipFile

# Percentiles of the fallback window (images without a VOI). 0.5/99.5 ignores the few
# extreme pixels (dead detector lines, collimator edges) that a plain min-max would let
# squash the contrast of the breast.
FALLBACK_PERCENTILES = (0.5, 99.5)
# The fallback window's statistics come from every 4th row and column: ~1/16 of the pixels,
# plenty for two percentiles, and the same sample in the fast and the exact path.
FALLBACK_SAMPLE_STEP = 4

FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
}

JPEG2000_SYNTAXES = {
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL,
    dicom_uid.HTJ2K,
}

# Uncompressed little-endian syntaxes whose Pixel Data bytes are the pixel words as they
# are (Deflated is inflated by pydicom when the file is read).
NATIVE_LITTLE_ENDIAN_SYNTAXES = {
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
}

# Resolution levels kept above what the display needs when decoding JPEG 2000 reduced.
J2K_HEADROOM_LEVELS = 1

LINEAR, LINEAR_EXACT, SIGMOID = "LINEAR", "LINEAR_EXACT", "SIGMOID"


# --------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------


def _looks_like_dataset(ds: Dataset) -> bool:
    """A forced read of any file yields *something*; a real DICOM dataset has image or SOP tags."""
    try:
        return any(keyword in ds for keyword in ("SOPClassUID", "PixelData", "Rows", "StudyInstanceUID"))
    except Exception:
        return False


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file, accepting files without the 128-byte preamble and 'DICM' prefix.

    Old ACR-NEMA style files and some exports are a bare dataset with no File Meta
    Information; pydicom reads them with ``force=True``, guessing implicit/explicit VR from
    the first element. A forced read of a non-DICOM file gives garbage or fails, so it only
    counts when image or SOP tags came out of it.
    """
    try:
        ds = pydicom.dcmread(path)
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
        ds = pydicom.dcmread(path, force=True)
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
    return name if name != sop_class else f"SOP Class {sop_class}"


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
    expected = _native_frame_bytes(ds) * number_of_frames(ds)
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


def _native_frame_bytes(ds: Dataset) -> int:
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * ((int(ds.BitsAllocated) + 7) // 8)


# --------------------------------------------------------------------------------------
# Checking that this is a greyscale image we import
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelFormat:
    """How stored pixel values are packed in the pixel words."""

    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool  # Pixel Representation 1: two's complement in Bits Stored bits

    def stored_from_words(self, words: np.ndarray) -> np.ndarray:
        """Raw pixel words (uintN as in the file) -> stored values (int64).

        Bits above Bits Stored may hold old-style overlay bits or garbage: they are masked
        off. Signed data is sign-extended from bit Bits Stored - 1 (a 12-bit signed value in
        a 16-bit word is *not* a valid int16 until then).
        """
        mask = (1 << self.bits_stored) - 1
        values = words.astype(np.int64) & mask
        if self.signed:
            sign_bit = 1 << (self.bits_stored - 1)
            values = (values ^ sign_bit) - sign_bit
        return values


def _int_field(ds: Dataset, keyword: str, tag: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise FailFile(f"missing {keyword} {tag}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FailFile(f"{keyword} {tag} is not an integer") from None


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
        raise SkipFile(f"colour image (Photometric Interpretation (0028,0004) {photometric or '?'}, "
                       f"Samples per Pixel (0028,0002) {samples}): only greyscale is imported")
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


# --------------------------------------------------------------------------------------
# The display chain (pointwise): stored value -> grey level 0..255
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str  # LINEAR, LINEAR_EXACT or SIGMOID

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        """Window the (modality-transformed) values to 0..1 (PS3.3 C.11.2.1.2 and C.11.2.1.3).

        These are pydicom's ``apply_windowing`` formulas, divided by the output range.
        """
        x = np.asarray(x, dtype=np.float64)
        if self.function == SIGMOID:
            return 1.0 / (1.0 + np.exp(-4.0 * (x - self.center) / self.width))
        if self.function == LINEAR:
            # LINEAR is defined on integer-ish display values: centre - 0.5 and width - 1.
            c, w = self.center - 0.5, self.width - 1.0
        else:
            c, w = self.center, self.width
        if w <= 0:  # LINEAR with width 1: a hard threshold at the centre
            return (x > c).astype(np.float64)
        # Below c - w/2 -> 0, above c + w/2 -> 1, linear between: exactly a clipped ramp.
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class DisplayChain:
    """Everything pointwise between a stored value and a display grey level, for one file."""

    modality: Callable[[np.ndarray], np.ndarray]  # stored -> modality values
    voi: str  # the ``voi`` hint: "window:LINEAR", "lut", "fallback:for-processing" ...
    window: Window | None = None  # a VOI window, or the fallback window as LINEAR_EXACT
    voi_lut: Callable[[np.ndarray], np.ndarray] | None = None  # modality values -> VOI LUT output
    voi_lut_range: tuple[float, float] = (0.0, 1.0)
    invert: bool = False  # MONOCHROME1 or Presentation LUT Shape INVERSE (once)
    padding: tuple[int, int] | None = None  # inclusive range of stored values that are padding
    needs_fallback: bool = False  # fallback window still to be measured on the frame
    notes: tuple[str, ...] = field(default_factory=tuple)

    def grey(self, stored: np.ndarray) -> np.ndarray:
        """Stored values (int) -> display grey levels, float64 in 0..255 (not yet rounded)."""
        if self.needs_fallback:
            raise RuntimeError("fallback window not measured: call with_fallback_window(frame) first")
        values = self.modality(stored)
        if self.voi_lut is not None:
            lo, hi = self.voi_lut_range
            unit = (self.voi_lut(values).astype(np.float64) - lo) / (hi - lo)
        else:
            assert self.window is not None
            unit = self.window.to_unit(values)
        if self.invert:
            unit = 1.0 - unit
        grey = unit * 255.0
        if self.padding is not None:
            # Padding (outside the detector / collimated area) is drawn black whatever the
            # polarity: it carries no image and would otherwise be white on MONOCHROME1.
            grey[self.is_padding(stored)] = 0.0
        return grey

    def is_padding(self, stored: np.ndarray) -> np.ndarray:
        if self.padding is None:
            return np.zeros(np.shape(stored), dtype=bool)
        lo, hi = self.padding
        return (stored >= lo) & (stored <= hi)

    def with_fallback_window(self, stored_sample: np.ndarray) -> "DisplayChain":
        """Measure the fallback window on a frame's non-padding pixels (see module docstring).

        ``stored_sample`` is ``fallback_sample(stored frame)``: the same pixels in both paths.
        """
        if not self.needs_fallback:
            return self
        sample = np.asarray(stored_sample).ravel()
        sample = sample[~self.is_padding(sample)]
        if sample.size == 0:
            lo, hi = 0.0, 1.0
        else:
            values = np.asarray(self.modality(sample), dtype=np.float64)
            lo, hi = (float(v) for v in np.percentile(values, FALLBACK_PERCENTILES))
        if hi <= lo:  # a flat image: any window shows it flat; avoid dividing by zero
            hi = lo + 1.0
        window = Window(center=(lo + hi) / 2.0, width=hi - lo, function=LINEAR_EXACT)
        return replace(self, window=window, needs_fallback=False)


def fallback_sample(frame: np.ndarray) -> np.ndarray:
    """Every FALLBACK_SAMPLE_STEP-th row and column of a frame: what the fallback window is measured on."""
    return frame[::FALLBACK_SAMPLE_STEP, ::FALLBACK_SAMPLE_STEP]


def _multi(ds: Dataset, keyword: str) -> list:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _padding_range(ds: Dataset, fmt: PixelFormat) -> tuple[int, int] | None:
    """Pixel Padding Value (0028,0120) [.. Pixel Padding Range Limit (0028,0121)] as stored values.

    Both are in stored-value space (before the Modality LUT). Their VR is US or SS depending
    on Pixel Representation, and writers get that wrong: -2000 written as US reads 63536.
    Interpreting the value's bits like a pixel word (mask to Bits Stored, sign-extend)
    gives the stored value the writer meant.
    """
    if ds.get("PixelPaddingValue") is None:
        return None
    word_mask = (1 << fmt.bits_allocated) - 1
    try:
        values = [int(ds.PixelPaddingValue)]
        if ds.get("PixelPaddingRangeLimit") is not None:
            values.append(int(ds.PixelPaddingRangeLimit))
    except (TypeError, ValueError):
        return None  # multi-valued or unreadable (UN) padding: no mask rather than no image
    stored = [int(fmt.stored_from_words(np.array([v & word_mask], dtype=np.uint64))[0]) for v in values]
    return min(stored), max(stored)


def _should_invert(ds: Dataset) -> bool:
    """MONOCHROME1 (minimum is white) and Presentation LUT Shape INVERSE say the same thing.

    DX/MG files pair MONOCHROME1 with INVERSE and MONOCHROME2 with IDENTITY; some writers
    give only one of the two. Either means "invert", and the image is inverted exactly once.
    """
    photometric = text(ds, "PhotometricInterpretation").upper()
    shape = text(ds, "PresentationLUTShape").upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _is_for_processing(ds: Dataset) -> bool:
    return (text(ds, "PresentationIntentType").upper() == "FOR PROCESSING"
            or text(ds, "SOPClassUID") in FOR_PROCESSING_SOP_CLASSES)


# Functional group macros that carry the display chain in enhanced multi-frame objects.
FUNCTIONAL_GROUP_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def _functional_group_items(ds: Dataset, frame: int) -> list[Dataset]:
    """The first item of each chain macro: shared groups first, then this frame's (which win)."""
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if shared:
        groups.append(shared[0])
    if frame < len(per_frame):
        groups.append(per_frame[frame])
    return [group[macro].value[0] for group in groups for macro in FUNCTIONAL_GROUP_MACROS
            if macro in group and len(group[macro].value)]


def _has_functional_group_values(ds: Dataset) -> bool:
    return bool(ds.get("SharedFunctionalGroupsSequence") or ds.get("PerFrameFunctionalGroupsSequence")) \
        and bool(_functional_group_items(ds, 0))


def frame_view(ds: Dataset, frame: int) -> Dataset:
    """``ds`` as the display chain sees one frame of an enhanced multi-frame object.

    Enhanced MG, Breast Tomosynthesis and Enhanced CT/MR files do not put Window Center /
    Width and Rescale Slope / Intercept at the top level: they sit in the Frame VOI LUT and
    Pixel Value Transformation functional groups, shared by all frames or given per frame.
    This copies the top level (shallow) and lays those values over it.
    """
    items = _functional_group_items(ds, frame)
    if not items:
        return ds
    view = Dataset(ds)
    view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    for item in items:
        for element in item:
            view[element.tag] = element
    return view


def display_chain(ds: Dataset, fmt: PixelFormat, options: NormalizeOptions) -> DisplayChain:
    """Choose the VOI (LUT, window or fallback) and polarity for this file."""
    notes: list[str] = []

    def modality(stored: np.ndarray) -> np.ndarray:
        # Modality LUT Sequence -> uint; Rescale Slope/Intercept -> float64; else unchanged.
        return apply_modality_lut(np.asarray(stored), ds)

    chain = DisplayChain(modality=modality, voi="", invert=_should_invert(ds), padding=_padding_range(ds, fmt))
    index = options.window_index

    voi_items = ds.get("VOILUTSequence") or []
    usable_items = [i for i, item in enumerate(voi_items) if item.get("LUTDescriptor") and item.get("LUTData")]
    if usable_items:
        chosen = index if index in usable_items else usable_items[0]
        if chosen != index:
            notes.append(f"voi-lut-index:{index} unavailable, used {chosen}")
        return _with_voi_lut(chain, ds, chosen, notes)

    centers, widths = _multi(ds, "WindowCenter"), _multi(ds, "WindowWidth")
    if centers and widths:
        n = min(len(centers), len(widths))
        chosen = index if index < n else 0
        if chosen != index:
            notes.append(f"window-index:{index} unavailable, used {chosen}")
        function = text(ds, "VOILUTFunction").upper() or LINEAR
        if function not in (LINEAR, LINEAR_EXACT, SIGMOID):
            notes.append(f"voi-function:{function} unknown, used LINEAR")
            function = LINEAR
        try:
            center, width = float(centers[chosen]), float(widths[chosen])
        except (TypeError, ValueError):
            center, width = math.nan, math.nan
        valid = math.isfinite(center) and math.isfinite(width) and (width >= 1 if function == LINEAR else width > 0)
        if valid:
            return replace(chain, voi=f"window:{function}", window=Window(center, width, function),
                           notes=tuple(notes))
        notes.append("window-invalid:Window Width (0028,1051)")
        return replace(chain, voi="fallback:invalid-window", needs_fallback=True, notes=tuple(notes + ["fallback:invalid-window"]))

    voi = "fallback:for-processing" if _is_for_processing(ds) else "fallback:no-voi"
    return replace(chain, voi=voi, needs_fallback=True, notes=tuple(notes + [voi]))


def _with_voi_lut(chain: DisplayChain, ds: Dataset, index: int, notes: list[str]) -> DisplayChain:
    """A VOI LUT Sequence item, scaled to 0..1 by the range of its own entries.

    The LUT Descriptor's third value (bits per entry) is often larger than what the data
    uses (16 declared, 12 used is common), so the entries' own min and max define black
    and white rather than 2**bits - 1.
    """
    item = ds.VOILUTSequence[index]
    descriptor = list(item.LUTDescriptor)
    entries = int(descriptor[0]) or 2**16
    first_mapped = int(descriptor[1])

    def voi_lut(values: np.ndarray) -> np.ndarray:
        # The LUT is indexed by integers: round modality output (float after a rescale).
        ints = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return apply_voi(ints, ds, index)

    table = voi_lut(np.arange(first_mapped, first_mapped + entries))
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        notes.append("voi-lut-flat")
        voi = "fallback:flat-voi-lut"
        return replace(chain, voi=voi, needs_fallback=True, notes=tuple(notes + [voi]))
    return replace(chain, voi="lut", voi_lut=voi_lut, voi_lut_range=(lo, hi), notes=tuple(notes))


# Pixels per np.take call in apply_table: numpy converts uint16 indices to intp before a
# gather; in slices of this size that temporary stays in cache (measured ~1.7x faster than
# one whole-image gather on a 4096 x 3328 image).
TABLE_CHUNK = 1 << 18


def apply_table(words: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[words]`` as uint8, computed in cache-sized slices."""
    out = np.empty(words.shape, dtype=np.uint8)
    flat_in, flat_out = words.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, TABLE_CHUNK):
        # mode="clip" skips the buffered bounds check; the table covers every possible word
        np.take(table, flat_in[start:start + TABLE_CHUNK], out=flat_out[start:start + TABLE_CHUNK], mode="clip")
    return out


def word_lut(chain: DisplayChain, fmt: PixelFormat) -> np.ndarray:
    """The whole chain as a uint8 table indexed by the raw pixel word (256 or 65,536 entries)."""
    words = np.arange(1 << fmt.bits_allocated, dtype=np.uint32)
    grey = chain.grey(fmt.stored_from_words(words))
    return np.rint(grey).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Getting the pixels out
# --------------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset) -> dicom_uid.UID:
    return dicom_uid.UID(ds.file_meta.TransferSyntaxUID)


def check_native_length(ds: Dataset, fmt: PixelFormat) -> None:
    """Uncompressed Pixel Data must hold Rows x Columns x Frames pixels; less means a truncated file."""
    if _transfer_syntax(ds).is_encapsulated:
        return
    expected = (fmt.rows * fmt.cols * number_of_frames(ds) * fmt.bits_allocated + 7) // 8
    actual = len(ds.PixelData or b"")
    if actual < expected:
        raise FailFile(f"Pixel Data (7FE0,0010) is truncated: {actual} of {expected} bytes")


def _native_words(ds: Dataset, fmt: PixelFormat, frame: int) -> np.ndarray | None:
    """A frame's raw pixel words as a view on the file buffer, for uncompressed little-endian data."""
    if _transfer_syntax(ds) not in NATIVE_LITTLE_ENDIAN_SYNTAXES or fmt.bits_allocated not in (8, 16):
        return None
    data = ds.PixelData
    per_frame = fmt.rows * fmt.cols
    itemsize = fmt.bits_allocated // 8
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype(np.uint8)
    flat = np.frombuffer(data, dtype=dtype, count=per_frame, offset=frame * per_frame * itemsize)
    return flat.reshape(fmt.rows, fmt.cols)


def _decoded_frame(ds: Dataset, frame: int) -> np.ndarray:
    """Decode one frame with pydicom 3 (plugins for compressed syntaxes).

    pydicom masks bits above Bits Stored and sign-extends signed data, so the result holds
    stored values in a uintN/intN array.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=frame, raw=True)
    except FailFile:
        raise
    except Exception as exc:
        raise FailFile(_decode_failure_reason(ds, exc)) from None
    if arr.ndim != 2:
        raise FailFile(f"decoded frame has shape {arr.shape}, expected Rows x Columns")
    return arr


def _decode_failure_reason(ds: Dataset, exc: Exception) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    name = dicom_uid.UID(syntax).name if syntax else "unknown transfer syntax"
    message = " ".join(line.strip() for line in str(exc).splitlines()[:2])
    if "length of the pixel data" in message or "truncated" in message.lower() or isinstance(exc, EOFError):
        return f"Pixel Data (7FE0,0010) is truncated or shorter than the header says ({name})"
    if isinstance(exc, (NotImplementedError, RuntimeError)):
        # pydicom's decoder errors ("Unable to decode as exceptions were raised by all
        # available plugins", "no decoders installed") describe codecs, not header values.
        return f"Pixel Data (7FE0,0010) cannot be decoded ({name}): {message[:160]}"
    # Other exceptions (ValueError from a malformed Rows, ...) may quote header values:
    # name the exception type only.
    return f"Pixel Data (7FE0,0010) undecodable ({name}): {type(exc).__name__} in the image header or data"


def _as_words(arr: np.ndarray, fmt: PixelFormat) -> np.ndarray | None:
    """pydicom's stored values as raw words (two's complement view), or None for 32-bit data."""
    if arr.dtype.itemsize * 8 != fmt.bits_allocated or arr.dtype.kind not in "iu" or fmt.bits_allocated > 16:
        return None
    return arr.view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)


# --------------------------------------------------------------------------------------
# JPEG 2000 at reduced resolution
# --------------------------------------------------------------------------------------


def j2k_decomposition_levels(codestream: bytes) -> int:
    """Number of wavelet decomposition levels in a JPEG 2000 codestream's COD marker (0 if unknown).

    Main header: SOC (FF4F), SIZ (FF51), ... COD (FF52): Lcod(2) Scod(1) SGcod(4) then SPcod,
    whose first byte is the number of decomposition levels (15444-1 A.6.1). A JP2 file
    wrapper, if present, is skipped by searching for the SOC marker.
    """
    start = codestream.find(b"\xff\x4f\xff\x51")
    if start < 0:
        return 0
    pos = start + 2
    while pos + 4 <= len(codestream):
        marker = codestream[pos:pos + 2]
        length = int.from_bytes(codestream[pos + 2:pos + 4], "big")
        if marker == b"\xff\x52":
            levels_at = pos + 2 + 2 + 1 + 4
            return codestream[levels_at] if levels_at < len(codestream) else 0
        if marker == b"\xff\x90" or length < 2:  # first tile-part: main header is over
            return 0
        pos += 2 + length
    return 0


def _j2k_reduce_factor(fmt: PixelFormat, options: NormalizeOptions) -> int:
    """How many resolution levels to drop: the reduced image stays >= 2x the display size.

    The display table is applied to the reduced image, i.e. after the wavelet's low-pass
    filter: resize-first, which is only approximately the exact chain (the chain is not
    linear) and is worst at edges that the window saturates. Keeping one level of headroom
    (reduced image at least twice the display size, then an exact area resize) halves that
    error for a fraction of the full decode. Measured in tests/importers/test_dicom.py.
    """
    long_side = max(fmt.rows, fmt.cols)
    if long_side <= options.long_side:
        return 0
    return max(0, int(math.floor(math.log2(long_side / options.long_side))) - J2K_HEADROOM_LEVELS)


def _j2k_reduced_words(ds: Dataset, fmt: PixelFormat, frame: int, reduce: int) -> tuple[np.ndarray, int] | None:
    """Decode a JPEG 2000 frame at 1/2**n size with Pillow: (stored-value words, n), or None.

    n is ``reduce`` bounded by the codestream's decomposition levels. The reduced image is
    ceil(rows / 2**n) x ceil(cols / 2**n).
    """
    if fmt.signed or fmt.bits_stored > 16:
        return None  # Pillow level-shifts signed data; leave those to pydicom at full size
    from pydicom.encaps import get_frame

    codestream = get_frame(ds.PixelData, frame, number_of_frames=number_of_frames(ds))
    reduce = min(reduce, j2k_decomposition_levels(codestream))
    if reduce < 1:
        return None
    parameters = pydicom.pixels.utils.get_j2k_parameters(codestream)
    if parameters.get("is_signed"):
        return None  # signed codestream (even for unsigned Pixel Representation): pydicom's job
    precision = parameters.get("precision", fmt.bits_stored)
    with Image.open(io.BytesIO(codestream), formats=("JPEG2000",)) as im:
        im.reduce = reduce  # Pillow's JPEG 2000 plugin: decode only the 1/2**n resolution level
        im.load()
        arr = np.asarray(im)
    expected_shape = (-(-fmt.rows // 2**reduce), -(-fmt.cols // 2**reduce))  # ceil division
    if arr.shape != expected_shape:
        return None
    container_bits = arr.dtype.itemsize * 8
    if precision < container_bits:
        # Pillow scales N-bit samples up to its 8- or 16-bit container (Jpeg2KDecode.c,
        # j2ku_gray_*); shift them back to stored values, as pydicom's pillow plugin does.
        arr = arr >> (container_bits - precision)
    words = arr.astype(np.uint16 if fmt.bits_allocated == 16 else np.uint8)
    return words, reduce


# --------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------


def display_size(rows: int, cols: int, long_side: int) -> tuple[int, int]:
    """(rows, cols) of the display image: long side <= long_side, aspect kept, never upscaled."""
    scale = min(1.0, long_side / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _area_along_first_axis(img: np.ndarray, n_out: int, origin: float, step: float) -> np.ndarray:
    """Average ``img`` over the intervals [origin + j*step, origin + (j+1)*step) of its first axis.

    A true area (box) filter with fractional weights at the interval ends: the pixels are
    treated as a piecewise-constant function, integrated through a cumulative sum, and each
    output is the integral over its interval divided by the interval's length (intervals
    are clipped to the image). Pillow's BOX filter is not this for non-integer factors: it
    takes whole pixels whose centres fall inside, which moves sharp edges by up to a pixel.
    """
    length = img.shape[0]
    accumulate = np.uint32 if img.dtype == np.uint8 else np.float64
    cumulative = np.zeros((length + 1,) + img.shape[1:], dtype=accumulate)
    np.cumsum(img, axis=0, dtype=accumulate, out=cumulative[1:])
    edges = np.clip(origin + step * np.arange(n_out + 1), 0.0, float(length))
    whole = np.minimum(np.floor(edges).astype(np.int64), length - 1)
    fraction = (edges - whole)[:, None]
    # integral from 0 to each edge: whole pixels, plus a fraction of the pixel the edge falls in
    integral = cumulative[whole].astype(np.float64) + fraction * img[whole].astype(np.float64)
    widths = np.maximum(np.diff(edges), 1e-12)[:, None]
    return (integral[1:] - integral[:-1]) / widths


def area_resize(img: np.ndarray, size: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0),
                step: tuple[float, float] | None = None) -> np.ndarray:
    """Exact area-average resize to ``size`` (rows, cols) as float64 (not rounded).

    By default the output covers the whole image. ``origin`` and ``step`` (in input pixels)
    place the output grid elsewhere, which the JPEG 2000 reduced-resolution path uses to
    line a reduced image up with the full-resolution grid.
    """
    rows, cols = size
    if step is None:
        step = (img.shape[0] / rows, img.shape[1] / cols)
    vertical = _area_along_first_axis(img, rows, origin[0], step[0])
    return _area_along_first_axis(vertical.T, cols, origin[1], step[1]).T


def area_resize_u8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area resize of a uint8 display image, rounded back to uint8.

    OpenCV's INTER_AREA is the same fractional-weight area average as :func:`area_resize`
    (pixels as a piecewise-constant function, partial pixels weighted at interval ends) in
    C, about 10x faster on a full-field mammogram; it differs from the float reference by
    rounding alone (at most 0.5 grey levels, checked in the tests).
    """
    import cv2

    rows, cols = size
    if img.shape == (rows, cols):
        return np.ascontiguousarray(img)
    cv2.setNumThreads(1)  # one image per process: parallelism comes from the worker processes
    return cv2.resize(np.ascontiguousarray(img), (cols, rows), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------
# Rendering one frame
# --------------------------------------------------------------------------------------


def _render_exact(ds: Dataset, chain: DisplayChain, frame: int, size: tuple[int, int],
                  decoded: np.ndarray | None = None) -> np.ndarray:
    """The float64 reference: chain at full resolution on pydicom's values, area resize, round once."""
    stored = _decoded_frame(ds, frame) if decoded is None else decoded
    stored = stored.astype(np.int64) if stored.dtype.kind in "iu" else stored.astype(np.float64)
    chain = chain.with_fallback_window(fallback_sample(stored))
    grey = chain.grey(stored)
    return np.clip(np.rint(area_resize(grey, size)), 0, 255).astype(np.uint8)


def _render_fast(ds: Dataset, fmt: PixelFormat, chain: DisplayChain, frame: int, size: tuple[int, int],
                 options: NormalizeOptions, notes: list[str]) -> np.ndarray:
    """Table lookup on the raw words (full resolution or J2K-reduced), then an 8-bit area resize."""
    # Reduced JPEG 2000 decoding only with a window from the header: a fallback window
    # measured on the smoothed reduced image would be narrower than the full-resolution one.
    if _transfer_syntax(ds) in JPEG2000_SYNTAXES and _j2k_reduce_factor(fmt, options) and not chain.needs_fallback:
        try:
            reduced = _j2k_reduced_words(ds, fmt, frame, _j2k_reduce_factor(fmt, options))
        except Exception:
            reduced = None  # Pillow could not: pydicom decodes it at full size below
        if reduced is not None:
            words, levels = reduced
            if "j2k:reduced" not in notes:
                notes.append("j2k:reduced")
            return _resize_reduced(apply_table(words, word_lut(chain, fmt)), 2**levels, fmt, size)
    words = _native_words(ds, fmt, frame)
    if words is None:
        decoded = _decoded_frame(ds, frame)
        words = _as_words(decoded, fmt)
        if words is None:  # 32-bit data: no table, the float chain does it
            return _render_exact(ds, chain, frame, size, decoded)
    if chain.needs_fallback:
        chain = chain.with_fallback_window(fmt.stored_from_words(fallback_sample(words)))
    return area_resize_u8(apply_table(words, word_lut(chain, fmt)), size)


def _resize_reduced(reduced: np.ndarray, k: int, fmt: PixelFormat, size: tuple[int, int]) -> np.ndarray:
    """Area-resize a JPEG 2000 reduced-resolution image on the full-resolution grid.

    Resolution level n of a JPEG 2000 codestream holds low-pass samples taken at every
    2**n-th full-resolution pixel (the wavelet keeps the even samples at each level), so
    reduced pixel i sits *on* full-resolution pixel 2**n * i, not in the middle of the block
    of 2**n pixels. Full-resolution coordinate x is reduced coordinate (x - 0.5) / 2**n + 0.5;
    the output grid is placed accordingly, which avoids a shift of up to half an output pixel.
    """
    origin = (0.5 - 0.5 / k, 0.5 - 0.5 / k)
    step = (fmt.rows / size[0] / k, fmt.cols / size[1] / k)
    return np.clip(np.rint(area_resize(reduced, size, origin, step)), 0, 255).astype(np.uint8)


def load_display_frames(path: str | Path, options: NormalizeOptions = NormalizeOptions(),
                        patient_key_secret: str | None = None) -> DicomImages:
    """Read one DICOM file and return its header hints and one 8-bit display image per frame.

    Raises SkipFile (not an image mammoflag imports) or FailFile (an image that cannot be
    imported); both have a ``reason`` safe to store and log. Any other exception would be a
    bug in this function, never the file's fault.
    """
    path = Path(path)
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


def _load(ds: Dataset, options: NormalizeOptions, patient_key_secret: str | None) -> DicomImages:
    notes: list[str] = []
    if "PixelData" in ds:
        _ensure_transfer_syntax(ds, notes)
    fmt = check_greyscale_image(ds)
    check_native_length(ds, fmt)
    hints = header_hints(ds, patient_key_secret)
    size = display_size(fmt.rows, fmt.cols, options.long_side)
    enhanced = _has_functional_group_values(ds)
    chain = display_chain(frame_view(ds, 0) if enhanced else ds, fmt, options)
    hints["voi"] = chain.voi
    frames = []
    for frame in range(hints["number_of_frames"]):
        if enhanced and frame > 0:
            chain = display_chain(frame_view(ds, frame), fmt, options)
        notes.extend(n for n in chain.notes if n not in notes)
        if options.exact:
            pixels = _render_exact(ds, chain, frame, size)
        else:
            pixels = _render_fast(ds, fmt, chain, frame, size, options, notes)
        frames.append(DisplayFrame(frame=frame, pixels=pixels))
    return DicomImages(hints=hints, frames=frames, notes=notes)
