"""Display PNGs (importers/png.py): ISA-L and the OpenCV fallback both give back exactly the pixels."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from importers.png import encode_png


def _displays() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    smooth = np.tile(np.linspace(0, 255, 832, dtype=np.uint8), (1024, 1))
    smooth[300:340, 400:420] = 255  # a marker-bright block: wraps the SUB differences round 0/255
    return [smooth, rng.integers(0, 256, (97, 61), dtype=np.uint8), np.zeros((1, 1), dtype=np.uint8),
            np.full((3, 700), 255, dtype=np.uint8), np.asfortranarray(rng.integers(0, 256, (40, 30), dtype=np.uint8))]


@pytest.mark.parametrize("use_isal", [True, False])
def test_png_pixels_are_identical_for_every_decoder(use_isal):
    for pixels in _displays():
        data = encode_png(pixels, use_isal=use_isal)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), pixels)


def test_isal_is_used_and_as_small_as_opencv():
    pytest.importorskip("isal")
    pixels = _displays()[0]
    fast, fallback = encode_png(pixels), encode_png(pixels, use_isal=False)
    assert fast != fallback  # a different deflate stream ...
    assert len(fast) <= 1.1 * len(fallback)  # ... of about the same size
