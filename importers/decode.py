"""Getting a frame's stored pixel values out of a DICOM data set: one concern per codec family.

- uncompressed little-endian Pixel Data is read as a view on the file buffer (no copy);
- every other syntax decodes through pydicom 3's ``pydicom.pixels`` and its plugins
  (pylibjpeg-openjpeg, -libjpeg, -rle, pyjpegls);
- JPEG 2000 frames the display downsizes by 4x or more decode at reduced resolution through
  Pillow's ``reduce`` (the codestream's own wavelet levels).

Failures are :class:`importers.types.FailFile` whose reasons name the field and transfer
syntax, never a header value or path.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from importers.headers import number_of_frames
from importers.types import FailFile, NormalizeOptions

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


def native_frame_bytes(ds: Dataset) -> int:
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * ((int(ds.BitsAllocated) + 7) // 8)


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

# --------------------------------------------------------------------------------------
# Getting the pixels out
# --------------------------------------------------------------------------------------


def transfer_syntax(ds: Dataset) -> dicom_uid.UID:
    return dicom_uid.UID(ds.file_meta.TransferSyntaxUID)


def check_native_length(ds: Dataset, fmt: PixelFormat) -> None:
    """Uncompressed Pixel Data must hold Rows x Columns x Frames pixels; less means a truncated file."""
    if transfer_syntax(ds).is_encapsulated:
        return
    expected = (fmt.rows * fmt.cols * number_of_frames(ds) * fmt.bits_allocated + 7) // 8
    actual = len(ds.PixelData or b"")
    if actual < expected:
        raise FailFile(f"Pixel Data (7FE0,0010) is truncated: {actual} of {expected} bytes")


def native_words(ds: Dataset, fmt: PixelFormat, frame: int) -> np.ndarray | None:
    """A frame's raw pixel words as a view on the file buffer, for uncompressed little-endian data."""
    if transfer_syntax(ds) not in NATIVE_LITTLE_ENDIAN_SYNTAXES or fmt.bits_allocated not in (8, 16):
        return None
    data = ds.PixelData
    per_frame = fmt.rows * fmt.cols
    itemsize = fmt.bits_allocated // 8
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype(np.uint8)
    flat = np.frombuffer(data, dtype=dtype, count=per_frame, offset=frame * per_frame * itemsize)
    return flat.reshape(fmt.rows, fmt.cols)


def decoded_frame(ds: Dataset, frame: int) -> np.ndarray:
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


def as_words(arr: np.ndarray, fmt: PixelFormat) -> np.ndarray | None:
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


def j2k_reduce_factor(fmt: PixelFormat, options: NormalizeOptions) -> int:
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


def j2k_reduced_words(ds: Dataset, fmt: PixelFormat, frame: int, reduce: int) -> tuple[np.ndarray, int] | None:
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
