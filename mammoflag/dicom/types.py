"""What the importer's stages hand each other: one DICOM file in, display frames and hints out.

``mammoflag.dicom.normalize.load_display_frames(path, options)`` is the pure core every caller uses
(the import command, the flagger reading DICOM folders, the benchmarks). It returns a
:class:`DicomImages` or raises :class:`SkipFile` (not an image we import: SR, RT plan,
colour, not DICOM) or :class:`FailFile` (an image we should import but cannot: truncated,
undecodable). Both carry a reason that names the file's problem and field, never a
patient identifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from mammoflag.datadir import HeaderHints

# Bump when the display image a given DICOM produces changes (LUT handling, resize, fallback).
DISPLAY_VERSION = "display-v1"
DEFAULT_LONG_SIDE = 1024
# Decode caps, checked on the header before any pixel data is decoded (a 9 KB file can declare a
# 60000 x 60000 image). The largest mammography detectors are ~28 megapixels at 16 bits (Fujifilm
# Amulet 4728 x 5928: 56 MB a frame); 256 MiB a frame is 128 megapixels at 16 bits, ~4.5x that.
# A file's frames together (breast tomosynthesis: 50-100 slices) may hold 32x as much.
DEFAULT_MAX_FRAME_MB = 256
DEFAULT_MAX_FILE_MB = 32 * DEFAULT_MAX_FRAME_MB


class ImportStatus(StrEnum):
    """A file's outcome, as the import report's ``status`` column writes it."""

    IMPORTED = "imported"
    SKIPPED = "skipped"
    FAILED = "failed"


class ImportProblem(Exception):
    """Base of the per-file outcomes that are not 'imported'. ``reason`` is safe to log and store."""

    status = ImportStatus.FAILED

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipFile(ImportProblem):
    """Not an image mammoflag imports (not DICOM, no pixel data, colour ...)."""

    status = ImportStatus.SKIPPED


class FailFile(ImportProblem):
    """An image that should import but cannot (truncated, undecodable, inconsistent header)."""

    status = ImportStatus.FAILED


@dataclass(frozen=True)
class NormalizeOptions:
    long_side: int = DEFAULT_LONG_SIDE  # display PNG long side in pixels (never upscaled)
    window_index: int = 0  # which VOI window / VOI LUT item when a file has several
    exact: bool = False  # True: the slow float64 reference chain (tests, benchmarks)
    max_frame_mb: int = DEFAULT_MAX_FRAME_MB  # Rows x Columns x bytes per sample of one frame, at most
    max_file_mb: int = DEFAULT_MAX_FILE_MB  # the same times Number of Frames, at most


@dataclass
class DisplayFrame:
    frame: int  # 0-based frame number within the file
    pixels: np.ndarray  # 2-D uint8, whole field of view, aspect kept, long side <= options.long_side


@dataclass
class DicomImages:
    """One DICOM file's import: header hints (no direct identifiers) and one display image per frame."""

    hints: HeaderHints  # see docs/CONTRACTS.md "Header hints"
    frames: list[DisplayFrame]
    notes: list[str] = field(default_factory=list)  # e.g. "for-processing: no VOI, fallback window"
