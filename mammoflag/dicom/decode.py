"""Getting a frame's stored pixel values out of a DICOM data set: one concern per codec family.

- uncompressed little-endian Pixel Data is read as a view on the file buffer (no copy); when
  pydicom deferred reading it (large values, see ``normalize.read_dataset``) the view is on the
  file mapped into memory, so the pixel words are never copied out of the page cache;
- every other syntax decodes through pydicom 3's ``pydicom.pixels`` and its plugins
  (pylibjpeg-openjpeg, -libjpeg, -rle, pyjpegls);
- JPEG 2000 frames the display downsizes by 4x or more decode at reduced resolution through
  Pillow's ``reduce`` (the codestream's own wavelet levels).

Failures are :class:`mammoflag.dicom.types.FailFile` whose reasons name the field and transfer
syntax, never a header value or path.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels import pixel_array

from mammoflag.dicom.headers import number_of_frames
from mammoflag.dicom.types import FailFile, NormalizeOptions

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

# Syntaxes whose Pixel Data value lies in the file byte for byte, where pydicom's offset points: a
# deferred value of these can be mapped from the file. Not Deflated: pydicom parses the inflated
# stream in memory, and its offsets are offsets in that stream.
MAPPABLE_SYNTAXES = {dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRLittleEndian}
UNDEFINED_LENGTH = 0xFFFFFFFF

# Resolution levels kept above what the display needs when decoding JPEG 2000 reduced.
J2K_HEADROOM_LEVELS = 1


# --------------------------------------------------------------------------------------
# Before decoding: how big the header says the image is, and is each frame's stream whole?
# --------------------------------------------------------------------------------------

MB = 2**20

# Encapsulated syntaxes whose frames are JPEG-family streams ending in EOI (FFD9): JPEG
# baseline/extended/lossless (ISO 10918) and JPEG-LS (ISO 14495).
JPEG_SYNTAXES = {
    dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLossless, dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless, dicom_uid.JPEGLSNearLossless,
}
END_OF_IMAGE = b"\xff\xd9"  # JPEG EOI and JPEG 2000 EOC share the marker value
# An encoder may pad a frame (DICOM pads fragments to even length with one 0x00; some add more).
MAX_TRAILING_PADDING = 16


def check_decode_size(ds: Dataset, fmt: PixelFormat, options: NormalizeOptions) -> None:
    """Refuse, on the header alone, an image whose decoded pixels would exceed the caps.

    Decoders allocate Rows x Columns x bytes per sample for each frame before they read a
    byte of the stream, so a tiny file declaring a huge image (a decompression bomb) would
    take a worker's memory. The reason names the fields and the cap, not the file.
    """
    frame_bytes = fmt.rows * fmt.cols * ((fmt.bits_allocated + 7) // 8)
    frames = number_of_frames(ds)
    if frame_bytes > options.max_frame_mb * MB:
        raise FailFile(f"image too large to decode: Rows (0028,0010) x Columns (0028,0011) x Bits Allocated "
                       f"(0028,0100) is {frame_bytes / MB:.0f} MB a frame, above the {options.max_frame_mb} MB "
                       f"cap (--max-frame-mb)")
    if frame_bytes * frames > options.max_file_mb * MB:
        raise FailFile(f"image too large to decode: Rows (0028,0010) x Columns (0028,0011) x Number of Frames "
                       f"(0028,0008) x Bits Allocated (0028,0100) is {frame_bytes * frames / MB:.0f} MB, above the "
                       f"{options.max_file_mb} MB cap (--max-file-mb)")


def frame_stream(ds: Dataset, frame: int) -> bytes:
    """One frame's encapsulated stream (all its fragments joined)."""
    from pydicom.encaps import get_frame

    try:
        return get_frame(ds.PixelData, frame, number_of_frames=number_of_frames(ds))
    except Exception as exc:  # an offset table or fragment list that does not add up
        raise FailFile(f"Pixel Data (7FE0,0010) frame {frame} cannot be found in the encapsulated data "
                       f"({type(exc).__name__})") from None


def check_encapsulated_frame(ds: Dataset, fmt: PixelFormat, frame: int) -> None:
    """Fail a compressed frame that is cut short or that describes another image than the header.

    Decoders fill what a truncated stream lacks with garbage instead of failing: a JPEG-LS
    frame cut to 30 % decodes with 70 % of its rows made up, a JPEG 2000 codestream missing
    tile-parts decodes those tiles as zeros. Checked here, on the stream's own structure:
    JPEG-family streams end in EOI; JPEG 2000 codestreams carry every tile of their SIZ grid,
    end in EOC, and their SIZ size is the header's Rows x Columns.
    """
    syntax = transfer_syntax(ds)
    if syntax in JPEG_SYNTAXES:
        if not _ends_with_marker(frame_stream(ds, frame)):
            raise FailFile(f"Pixel Data (7FE0,0010) frame {frame} is truncated: the {syntax.name} stream has no "
                           "end-of-image marker")
    elif syntax in JPEG2000_SYNTAXES:
        check_j2k_codestream(frame_stream(ds, frame), fmt, frame)


def _ends_with_marker(stream: bytes) -> bool:
    return END_OF_IMAGE in stream[-(len(END_OF_IMAGE) + MAX_TRAILING_PADDING):]


def j2k_siz(codestream: bytes) -> dict[str, int] | None:
    """The SIZ marker segment of a JPEG 2000 codestream (15444-1 A.5.1), or None without one.

    SIZ follows SOC (FF4F) directly: Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz
    YTOsiz (4 each) Csiz(2). A JP2 file wrapper, if present, is skipped by finding SOC SIZ.
    """
    start = codestream.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 4 + 38 > len(codestream):
        return None
    body = codestream[start + 4:]
    names = ("Lsiz", "Rsiz", "Xsiz", "Ysiz", "XOsiz", "YOsiz", "XTsiz", "YTsiz", "XTOsiz", "YTOsiz", "Csiz")
    sizes = (2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 2)
    out, pos = {"start": start}, 0
    for name, size in zip(names, sizes):
        out[name] = int.from_bytes(body[pos:pos + size], "big")
        pos += size
    return out


def check_j2k_codestream(codestream: bytes, fmt: PixelFormat, frame: int) -> None:
    """SIZ against Rows / Columns, then every tile-part present and the codestream closed by EOC."""
    siz = j2k_siz(codestream)
    where = f"Pixel Data (7FE0,0010) frame {frame}"
    if siz is None:
        raise FailFile(f"{where} is not a JPEG 2000 codestream (no SOC / SIZ marker)")
    width, height = siz["Xsiz"] - siz["XOsiz"], siz["Ysiz"] - siz["YOsiz"]
    if (height, width) != (fmt.rows, fmt.cols) or siz["Csiz"] != 1:
        raise FailFile(f"{where}: the JPEG 2000 SIZ marker's image size or component count does not match "
                       "Rows (0028,0010) x Columns (0028,0011) x Samples per Pixel (0028,0002)")
    if siz["XTsiz"] < 1 or siz["YTsiz"] < 1:
        raise FailFile(f"{where}: the JPEG 2000 SIZ marker has an empty tile size")
    tiles_x = -(-(siz["Xsiz"] - siz["XTOsiz"]) // siz["XTsiz"])
    tiles_y = -(-(siz["Ysiz"] - siz["YTOsiz"]) // siz["YTsiz"])
    found = _j2k_tiles(codestream, siz["start"] + 2 + 2 + siz["Lsiz"])
    if found is None:
        raise FailFile(f"{where} is truncated: a JPEG 2000 tile-part runs past the end of the data")
    if len(found) < tiles_x * tiles_y:
        raise FailFile(f"{where} is truncated: the JPEG 2000 codestream holds {len(found)} of its "
                       f"{tiles_x * tiles_y} tiles")


def _j2k_tiles(codestream: bytes, pos: int) -> set[int] | None:
    """Tile indices of the tile-parts after the main header; None when one runs past the end or EOC is missing.

    Main header marker segments (COD, QCD, COM ...) are FFxx + a 2-byte length; tile-parts
    start with SOT (FF90): Lsot(2) Isot(2) Psot(4) TPsot(1) TNsot(1), Psot being the tile-part's
    length from the SOT marker on (0: it runs to EOC).
    """
    end = len(codestream)
    while pos + 4 <= end and codestream[pos:pos + 2] != b"\xff\x90":
        if codestream[pos] != 0xFF:
            return None
        pos += 2 + int.from_bytes(codestream[pos + 2:pos + 4], "big")
    tiles: set[int] = set()
    while pos + 12 <= end and codestream[pos:pos + 2] == b"\xff\x90":
        tiles.add(int.from_bytes(codestream[pos + 4:pos + 6], "big"))
        length = int.from_bytes(codestream[pos + 6:pos + 10], "big")
        if length == 0:  # the last tile-part: runs to the EOC marker
            return tiles if _ends_with_marker(codestream) else None
        if length < 12 or pos + length > end:
            return None
        pos += length
    return tiles if codestream[pos:pos + 2] == END_OF_IMAGE else None


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
    actual = pixel_data_length(ds)
    if actual < expected:
        raise FailFile(f"Pixel Data (7FE0,0010) is truncated: {actual} of {expected} bytes")


def deferred_pixel_data(ds: Dataset) -> RawDataElement | None:
    """The Pixel Data element when pydicom deferred reading its value and the file holds it as it is.

    That is: read from a path (not from a buffer, as a Deflated data set is), in a little-endian
    uncompressed syntax, with a defined length and the value not yet read. ``value_tell`` is
    then the value's offset in the file.
    """
    if not isinstance(ds, FileDataset) or ds.buffer is not None or not isinstance(ds.filename, str):
        return None
    if transfer_syntax(ds) not in MAPPABLE_SYNTAXES:
        return None
    element = ds.get_item("PixelData", keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.value is not None or element.length == UNDEFINED_LENGTH:
        return None
    return element


def pixel_data_length(ds: Dataset) -> int:
    """Bytes of Pixel Data value the file holds, without reading a deferred value.

    A truncated file ends inside the value: what is left of it, as pydicom would read it.
    """
    element = deferred_pixel_data(ds)
    if element is None:
        return len(ds.PixelData or b"")
    try:
        file_size = os.stat(str(ds.filename)).st_size
    except OSError:
        return len(ds.PixelData or b"")  # gone since the header was read: pydicom says what it finds
    return max(0, min(element.length, file_size - element.value_tell))


def mapped_pixel_data(ds: Dataset) -> tuple[mmap.mmap, int] | None:
    """The file mapped read-only and the offset of its Pixel Data value, or None (then read it).

    Mapping instead of reading saves copying a mammogram's 27 MB out of the page cache and
    faulting in a fresh buffer for it. The file must be the one the header was read from (same
    modification time, still long enough); otherwise pydicom's own deferred read decides. A file
    truncated *while* mapped would make its worker die on a bus error: the importer retries
    such a file alone in a fresh process and fails it (``importers.run._crashed``).
    """
    element = deferred_pixel_data(ds)
    if element is None:
        return None
    try:
        with open(str(ds.filename), "rb") as fh:
            stat = os.fstat(fh.fileno())
            if stat.st_mtime != ds.timestamp or stat.st_size < element.value_tell + element.length:
                return None
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), element.value_tell
    except (OSError, ValueError):  # no such file any more, a file system without mmap
        return None


def native_words(ds: Dataset, fmt: PixelFormat, frame: int) -> np.ndarray | None:
    """A frame's raw pixel words as a view on the file buffer, for uncompressed little-endian data."""
    if transfer_syntax(ds) not in NATIVE_LITTLE_ENDIAN_SYNTAXES or fmt.bits_allocated not in (8, 16):
        return None
    per_frame = fmt.rows * fmt.cols
    itemsize = fmt.bits_allocated // 8
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype(np.uint8)
    mapped = mapped_pixel_data(ds)
    data, start = mapped if mapped is not None else (ds.PixelData, 0)
    # the view keeps the mapping alive; it is unmapped when the last view goes
    flat = np.frombuffer(data, dtype=dtype, count=per_frame, offset=start + frame * per_frame * itemsize)
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
        # Pillow's JPEG 2000 plugin reads a plain int here (not the Image.reduce method it shadows):
        # decode only the 1/2**n resolution level
        im.reduce = reduce  # type: ignore[method-assign, assignment]
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
