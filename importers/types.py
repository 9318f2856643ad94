"""What the importer's stages hand each other: one DICOM file in, display frames and hints out.

``importers.dicom.load_display_frames(path, options)`` is the pure core every caller uses
(the import command, the flagger reading DICOM folders, the benchmarks). It returns a
:class:`DicomImages` or raises :class:`SkipFile` (not an image we import: SR, RT plan,
colour, not DICOM) or :class:`FailFile` (an image we should import but cannot: truncated,
undecodable). Both carry a reason that names the file's problem and field, never a
patient identifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Bump when the display image a given DICOM produces changes (LUT handling, resize, fallback).
DISPLAY_VERSION = "display-v1"
DEFAULT_LONG_SIDE = 1024


class ImportProblem(Exception):
    """Base of the per-file outcomes that are not 'imported'. ``reason`` is safe to log and store."""

    status = "failed"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipFile(ImportProblem):
    """Not an image mammoflag imports (not DICOM, no pixel data, colour ...)."""

    status = "skipped"


class FailFile(ImportProblem):
    """An image that should import but cannot (truncated, undecodable, inconsistent header)."""

    status = "failed"


@dataclass(frozen=True)
class NormalizeOptions:
    long_side: int = DEFAULT_LONG_SIDE  # display PNG long side in pixels (never upscaled)
    window_index: int = 0  # which VOI window / VOI LUT item when a file has several
    exact: bool = False  # True: the slow float64 reference chain (tests, benchmarks)


@dataclass
class DisplayFrame:
    frame: int  # 0-based frame number within the file
    pixels: np.ndarray  # 2-D uint8, whole field of view, aspect kept, long side <= options.long_side


@dataclass
class DicomImages:
    """One DICOM file's import: header hints (no direct identifiers) and one display image per frame."""

    hints: dict[str, Any]  # see docs/CONTRACTS.md "Header hints"
    frames: list[DisplayFrame]
    notes: list[str] = field(default_factory=list)  # e.g. "for-processing: no VOI, fallback window"
