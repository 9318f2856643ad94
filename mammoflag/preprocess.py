"""Model input from a display image: the one function training, the backend and the flagger call.

The display image (8-bit grey PNG, whole field of view, aspect kept) is written by the
importer. The model input is five uint8 planes of ``size`` x ``size``: the whole image
reduced, and the image's most marker-like spots at full display resolution.

The whole image, letterboxed (long side resized to ``size``, centred, black padding; never
cropped: markers cut by the image edge are the hard cases):

0. ``area``: the display image area-averaged down: tissue, texture, the field of view (what a
   magnification view is told by).
1. ``max``: the brightest display pixel under each model pixel (a dilation, then sampling at
   the footprint's corner). Area averaging dilutes a one-pixel wire or a 10 px ring towards
   the tissue around it; this plane keeps it at full brightness however far the image shrinks.
2. ``tophat``: the white top-hat of the display image at display resolution (the image minus
   its morphological opening with a square ``TOPHAT_FRACTION`` of the long side), reduced like
   ``max``: small bright structures over their local background, whatever window the vendor
   chose; large bright regions (dense tissue, the pectoral muscle) vanish from it.

The candidate spots, tiled (``size // PATCH`` x ``size // PATCH`` tiles of ``PATCH`` x ``PATCH``):

3. ``patch``: display pixels, unreduced, around each of the ``(size // PATCH) ** 2`` strongest
   local maxima of the top-hat summed over a marker-sized window (``candidates``), strongest
   first, row by row; tiles without a candidate are black.
4. ``patch_tophat``: the top-hat at the same places.

A marker ~1 % of the long side is ~2.5 px at a 256 px input, too small to tell from a
calcification or a letter of burned-in text; in the tiles it keeps its 10 display pixels, and
the network looks at 64 tiles of 32 x 32 instead of a 1024 px image (``training/network.py``).

uint8, not float: the tensor crosses process boundaries in the flagger (a 3 x 512 x 512 float32
costs ~15 ms to pickle between processes, uint8 under 1 ms) and a training run holds every
input in memory. The network scales its input itself (``training.network.InputScale``), so the
ONNX model takes these values as float32 0..255 and ``OnnxClassifier`` casts the batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CHANNELS = ("area", "max", "tophat", "patch", "patch_tophat")
TOPHAT_FRACTION = 0.03  # opening side / display long side: larger than a marker (<= ~3 %), smaller than tissue
PATCH = 32  # candidate tile side, display pixels
CANDIDATE_WINDOW = 7  # top-hat summed over this square (display px) to rank candidate spots
CANDIDATE_CELL = 16  # at most one candidate per cell of this side (display px), none beside a stronger one
# Kept for models that normalise as ImageNet did (the optional ResNet18 body; the tiny test model).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_display_image(path: str | Path) -> np.ndarray:
    """Read a display PNG as a 2-D uint8 array.

    OpenCV decodes the importer's 8-bit grey PNGs ~20 % faster than Pillow; anything else (a missing
    or unreadable file, colour, 16 bits) goes to Pillow, whose exceptions callers report."""
    if Path(path).is_file():
        arr = _cv2().imread(str(path), -1)  # IMREAD_UNCHANGED: None when it cannot decode the file
        if arr is not None and arr.ndim == 2 and arr.dtype == np.uint8:
            return arr
    with Image.open(path) as im:
        return np.asarray(im if im.mode == "L" else im.convert("L"))


def _cv2():
    import cv2

    cv2.setNumThreads(1)  # one decode process is one core's worth of work (the flagger runs several)
    return cv2


def _resized_size(h: int, w: int, size: int) -> tuple[int, int, float]:
    scale = size / max(h, w)
    return max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale))), scale


def _shrink_max(cv2, image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """Each output pixel = the maximum over its source footprint (never less than the brightest pixel in it).

    cv2's nearest-neighbour resize samples source pixel floor(i * h / nh); a dilation whose
    kernel reaches ``ceil(h / nh)`` pixels forward from its anchor (one more when the ratio
    is fractional, as footprints then straddle) makes that sample the footprint's maximum.
    """
    h, w = image.shape
    ry, rx = h / nh, w / nw
    ky = math.ceil(ry - 1e-9) + (0 if abs(ry - round(ry)) < 1e-9 else 1)
    kx = math.ceil(rx - 1e-9) + (0 if abs(rx - round(rx)) < 1e-9 else 1)
    if ky > 1 or kx > 1:
        image = cv2.dilate(image, np.ones((ky, kx), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_NEAREST)


def tophat(display: np.ndarray) -> np.ndarray:
    """White top-hat of a display image: what is brighter than every ``TOPHAT_FRACTION``-wide square around it."""
    cv2 = _cv2()
    k = max(3, 2 * round(TOPHAT_FRACTION * max(display.shape) / 2) + 1)
    return cv2.morphologyEx(display, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))


def letterbox(display: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image so its long side is ``size`` (area average) and pad (black) to size x size, centred."""
    return _letterboxed(display, size)[0]


def whole_image_planes(display: np.ndarray, size: int) -> np.ndarray:
    """(3, size, size) uint8: the whole-image planes of ``model_input`` (area, max, top-hat) alone, without the
    candidate tiles (the zoom pretext's crops, ``training.pretext.zoom_crops``)."""
    return _letterboxed(display, size, channels=3)


def _check(display: np.ndarray) -> None:
    if display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError(f"display image must be 2-D uint8, got {display.shape} {display.dtype}")


def _letterboxed(display: np.ndarray, size: int, channels: int = 1, hat: np.ndarray | None = None) -> np.ndarray:
    _check(display)
    cv2 = _cv2()
    h, w = display.shape
    nh, nw, scale = _resized_size(h, w, size)
    out = np.zeros((channels, size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    display = np.ascontiguousarray(display)
    if scale < 1:
        out[0, top:top + nh, left:left + nw] = cv2.resize(display, (nw, nh), interpolation=cv2.INTER_AREA)
        if channels > 1:
            out[1, top:top + nh, left:left + nw] = _shrink_max(cv2, display, nh, nw)
        if channels > 2:
            out[2, top:top + nh, left:left + nw] = _shrink_max(cv2, tophat(display) if hat is None else hat, nh, nw)
    else:  # a display smaller than the input (tiny test images): enlarge every channel smoothly
        planes = [display, display, tophat(display) if hat is None else hat][:channels]
        for c, plane in enumerate(planes):
            out[c, top:top + nh, left:left + nw] = (plane if (nh, nw) == (h, w)
                                                    else cv2.resize(plane, (nw, nh), interpolation=cv2.INTER_LINEAR))
    return out


def candidates(hat: np.ndarray, k: int) -> np.ndarray:
    """(n <= k, 2) display (row, col) of the ``k`` strongest candidate spots of a top-hat image, strongest first.

    The top-hat is summed over ``CANDIDATE_WINDOW`` squares (a ring, a cross or a coil sums many
    bright pixels; one noise pixel does not), the image is cut into ``CANDIDATE_CELL`` cells, each
    cell offers its strongest pixel, and a cell whose 8 neighbours include a stronger one offers
    nothing (one object, one candidate). Scored at half resolution (the top-hat's maximum of each 2 x 2:
    a quarter of the work), so a centre is good to a display pixel."""
    if k <= 0:
        return np.zeros((0, 2), np.int64)
    cv2 = _cv2()
    f = 2 if min(hat.shape) >= 4 * CANDIDATE_CELL else 1
    if f > 1:  # the brightest of each 2 x 2: a one-pixel stroke keeps its brightness
        hat = cv2.dilate(hat, np.ones((f, f), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)[::f, ::f]
    window, c = max(1, round(CANDIDATE_WINDOW / f)), CANDIDATE_CELL // f
    score = cv2.boxFilter(hat, cv2.CV_16U, (window, window), normalize=False,
                          borderType=cv2.BORDER_CONSTANT)  # <= 49 * 255: fits
    h, w = score.shape
    gh, gw = -(-h // c), -(-w // c)
    if (gh * c, gw * c) != (h, w):
        score = cv2.copyMakeBorder(score, 0, gh * c - h, 0, gw * c - w, cv2.BORDER_CONSTANT, value=0)
    cells = score.reshape(gh, c, gw, c)
    best = cells.max(axis=(1, 3)).astype(np.float64)  # each cell's strongest score
    # at least as strong as every neighbour; ties (scores are whole numbers) go to the first in row-major order
    keyed = best - np.arange(gh * gw, dtype=np.float64).reshape(gh, gw) * (0.5 / (gh * gw))
    neighbours = cv2.dilate(keyed, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=-1.0)
    ys, xs = np.nonzero((keyed >= neighbours) & (best > 0))
    if len(ys) > k:
        top = np.argpartition(-keyed[ys, xs], k - 1)[:k]
        ys, xs = ys[top], xs[top]
    rank = np.argsort(-keyed[ys, xs], kind="stable")
    ys, xs = ys[rank], xs[rank]
    flat = cells[ys, :, xs, :].reshape(len(ys), c * c).argmax(axis=1)  # the chosen cells only
    centre = (f - 1) / 2  # a half-resolution pixel covers f display pixels
    return np.stack([(ys * c + flat // c) * f + centre, (xs * c + flat % c) * f + centre], axis=1).round().astype(np.int64)


def _tiles(planes: Sequence[np.ndarray], centres: np.ndarray, size: int) -> np.ndarray:
    """(len(planes), size, size): PATCH x PATCH crops of each plane around each centre, tiled row by row."""
    grid = size // PATCH
    out = np.zeros((len(planes), size, size), dtype=np.uint8)
    h, w = planes[0].shape
    half = PATCH // 2
    for n, (y, x) in enumerate(centres[: grid * grid]):
        ty, tx = (n // grid) * PATCH, (n % grid) * PATCH
        y0, x0 = int(y) - half, int(x) - half
        sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + PATCH), min(w, x0 + PATCH)
        for c, plane in enumerate(planes):
            out[c, ty + sy0 - y0:ty + sy1 - y0, tx + sx0 - x0:tx + sx1 - x0] = plane[sy0:sy1, sx0:sx1]
    return out


def model_input(display: np.ndarray, size: int) -> np.ndarray:
    """Display image (H, W) uint8 -> model input (5, size, size) uint8: ``CHANNELS``."""
    _check(display)
    display = np.ascontiguousarray(display)
    hat = tophat(display)
    out = np.zeros((len(CHANNELS), size, size), dtype=np.uint8)
    out[:3] = _letterboxed(display, size, channels=3, hat=hat)
    grid = size // PATCH
    out[3:] = _tiles([display, hat], candidates(hat, grid * grid), size)
    return out


def model_input_batch(displays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stack model inputs into an (N, 5, size, size) uint8 batch."""
    if not displays:
        return np.zeros((0, len(CHANNELS), size, size), dtype=np.uint8)
    return np.stack([model_input(d, size) for d in displays])


def letterbox_coords(points: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """Display coordinates (row, col) -> the same places in ``letterbox(display, size)`` (both continuous:
    pixel (r, c) covers [r, r + 1) x [c, c + 1)); ``shape`` is the display's (h, w). Pure; what
    ``_letterboxed`` does to the image, for drawing display-space places (candidate tiles) over it."""
    h, w = shape
    nh, nw, _ = _resized_size(h, w, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.stack([top + p[:, 0] * (nh / h), left + p[:, 1] * (nw / w)], axis=1)
