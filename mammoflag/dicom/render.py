"""Display frames: resizing (exact area average) and rendering one frame through the display chain.

The fast path applies the chain as a uint8 table to the raw pixel words (full resolution
or JPEG 2000 reduced) and area-resizes the 8-bit result; the exact path is the float64
reference (chain at full resolution, float area resize, rounded once). When the display is
exactly 1/4, 1/8 or 1/16 of the image (a 4096 x 3328 detector at 1024 px) the table and the
resize run together in bands, with the same result (:func:`table_then_area_resize`).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from mammoflag.dicom.decode import (
    JPEG2000_SYNTAXES,
    PixelFormat,
    as_words,
    decoded_frame,
    j2k_reduce_factor,
    j2k_reduced_words,
    native_words,
    transfer_syntax,
)
from mammoflag.dicom.display import TABLE_CHUNK, DisplayChain, apply_table, fallback_sample, word_lut
from mammoflag.dicom.types import NormalizeOptions

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


# Reductions that table_then_area_resize does in 2x2 steps: powers of two whose block sums of
# 8-bit greys still fit 16 bits (16 x 16 x 255 = 65280).
POWER_OF_TWO_FACTORS = (4, 8, 16)


def power_of_two_factor(shape: tuple[int, ...], size: tuple[int, int]) -> int | None:
    """k when ``size`` is exactly ``shape`` / k on both axes for k in POWER_OF_TWO_FACTORS, else None."""
    rows, cols = shape
    k = rows // size[0]
    if k in POWER_OF_TWO_FACTORS and (rows, cols) == (k * size[0], k * size[1]):
        return k
    return None


def table_then_area_resize(words: np.ndarray, table: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``area_resize_u8(apply_table(words, table), size)``: the same pixels, in one banded pass when it can."""
    k = power_of_two_factor(words.shape, size)
    if k is None:
        return area_resize_u8(apply_table(words, table), size)
    return _banded_block_means(words, table, k, size)


def _banded_block_means(words: np.ndarray, table: np.ndarray, k: int, size: tuple[int, int]) -> np.ndarray:
    """The table, then the mean of each k x k block rounded half to even, as OpenCV's INTER_AREA does it.

    For an exact 1/k reduction INTER_AREA sums each k x k block of 8-bit greys and rounds
    sum / k**2 half to even, in a plain C loop of k**2 loads per output pixel (it has SIMD for
    2x2 only). Here the table is scaled by k**2 into 16 bits, then log2(k) SIMD 2x2 INTER_AREA
    steps in uint16 each divide block sums that are multiples of 4 by 4 -- exact, so their own
    rounding never acts -- and convertScaleAbs rounds sum / k**2 once, half to even (a division
    by a power of two is exact in float). In bands of rows, the 16-bit greys stay in the cache.
    """
    import cv2

    cv2.setNumThreads(1)  # as area_resize_u8: parallelism comes from the worker processes
    steps = k.bit_length() - 1
    scaled = table.astype(np.uint16) << (2 * steps)  # grey * k**2: at most 65280
    rows, cols = words.shape
    band = max(k, TABLE_CHUNK // cols // k * k)  # whole blocks, ~TABLE_CHUNK pixels (np.take copies indices)
    sums = np.empty((band, cols), dtype=np.uint16)
    out = np.empty(size, dtype=np.uint8)
    for top in range(0, rows, band):
        n = min(band, rows - top)  # a multiple of k, as rows is
        block = sums[:n]
        np.take(scaled, words[top:top + n], out=block, mode="clip")
        for _ in range(steps):
            block = cv2.resize(block, (block.shape[1] // 2, block.shape[0] // 2), interpolation=cv2.INTER_AREA)
        out[top // k:(top + n) // k] = cv2.convertScaleAbs(block, alpha=1.0 / (k * k))
    return out


# --------------------------------------------------------------------------------------
# Rendering one frame
# --------------------------------------------------------------------------------------


def render_exact(ds: Dataset, chain: DisplayChain, frame: int, size: tuple[int, int],
                  decoded: np.ndarray | None = None) -> np.ndarray:
    """The float64 reference: chain at full resolution on pydicom's values, area resize, round once."""
    stored = decoded_frame(ds, frame) if decoded is None else decoded
    stored = stored.astype(np.int64) if stored.dtype.kind in "iu" else stored.astype(np.float64)
    chain = chain.with_fallback_window(fallback_sample(stored))
    grey = chain.grey(stored)
    return np.clip(np.rint(area_resize(grey, size)), 0, 255).astype(np.uint8)


def render_fast(ds: Dataset, fmt: PixelFormat, chain: DisplayChain, frame: int, size: tuple[int, int],
                 options: NormalizeOptions, notes: list[str]) -> np.ndarray:
    """Table lookup on the raw words (full resolution or J2K-reduced), then an 8-bit area resize."""
    # Reduced JPEG 2000 decoding only with a window from the header: a fallback window
    # measured on the smoothed reduced image would be narrower than the full-resolution one.
    if transfer_syntax(ds) in JPEG2000_SYNTAXES and j2k_reduce_factor(fmt, options) and not chain.needs_fallback:
        try:
            reduced = j2k_reduced_words(ds, fmt, frame, j2k_reduce_factor(fmt, options))
        except Exception:
            reduced = None  # Pillow could not: pydicom decodes it at full size below
        if reduced is not None:
            reduced_words, levels = reduced
            if "j2k:reduced" not in notes:
                notes.append("j2k:reduced")
            return _resize_reduced(apply_table(reduced_words, word_lut(chain, fmt)), 2**levels, fmt, size)
    words = native_words(ds, fmt, frame)
    if words is None:
        decoded = decoded_frame(ds, frame)
        words = as_words(decoded, fmt)
        if words is None:  # 32-bit data: no table, the float chain does it
            return render_exact(ds, chain, frame, size, decoded)
    if chain.needs_fallback:
        chain = chain.with_fallback_window(fmt.stored_from_words(fallback_sample(words)))
    return table_then_area_resize(words, word_lut(chain, fmt), size)


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
