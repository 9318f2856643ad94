"""What the flagger's stages hand each other: work units in, per-image records out.

A *work unit* is the smallest piece of input that succeeds or fails as a whole: one row
of an import's manifest.csv (one display PNG) or one DICOM file (one or more frames).
Units are what the checkpoint marks done, what shards are made of, and what the errors
file accounts for. Everything here is plain data, cheap to pickle to a decode process
and to write as JSON into a shard file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from mammoflag.datadir import FLAGGER_HINT_FIELDS

class UnitKind(StrEnum):
    """What a work unit is: one display PNG of an import DATA_DIR, one DICOM file, or one DICOMweb instance."""

    DISPLAY = "display"
    DICOM = "dicom"
    DICOMWEB = "dicomweb"  # one instance of a DICOMweb archive, retrieved by the decode process itself


# The per-image header fields the flagger keeps, in the order images.csv shows them (defined
# once, with the manifest's columns, in mammoflag/datadir.py). List values are '|'-joined.
HINT_FIELDS: tuple[str, ...] = FLAGGER_HINT_FIELDS


@dataclass(frozen=True)
class WorkUnit:
    """One input item: ``unit_id`` is the manifest key or the DICOM path relative to the input."""

    unit_id: str  # a DICOMweb instance: its WADO-RS path below the service root (studies/.../instances/...)
    kind: UnitKind
    path: str  # absolute path of the PNG or DICOM file; a DICOMweb instance's URL (no credentials)
    manifest_row: dict[str, str] | None = None  # the manifest.csv row of a display unit

    def to_json(self) -> dict[str, Any]:
        return {"unit_id": self.unit_id, "kind": self.kind, "path": self.path, "manifest_row": self.manifest_row}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WorkUnit":
        return cls(d["unit_id"], UnitKind(d["kind"]), d["path"], d.get("manifest_row"))


@dataclass(frozen=True)
class Problem:
    """Why a unit (or one image of it) produced no result; ``reason`` is safe to log and store."""

    status: str  # "failed" | "skipped" | "duplicate"
    reason: str
    key: str = ""  # image key when the problem concerns one image of the unit


@dataclass
class PreparedImage:
    """One image ready for the model: its header hints and its model input tensor."""

    key: str
    hints: dict[str, str]
    tensor: np.ndarray  # (planes, size, size) uint8 from mammoflag.preprocess.model_input
    header: np.ndarray | None = None  # mammoflag.header_evidence of its header (None: the header said nothing)


@dataclass
class PreparedUnit:
    unit: WorkUnit
    images: list[PreparedImage] = field(default_factory=list)
    problem: Problem | None = None


@dataclass(frozen=True)
class ImageRecord:
    """One classified image: what the checkpoint stores."""

    key: str
    hints: dict[str, str]
    probs: tuple[float, ...]  # calibrated, in the model spec's class order
    novelty: float | None = None  # mammoflag.novelty (> 1: beyond the validation's reference); None: no reference

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "hints": self.hints, "probs": list(self.probs), "novelty": self.novelty}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ImageRecord":
        novelty = d.get("novelty")
        return cls(d["key"], dict(d["hints"]), tuple(float(p) for p in d["probs"]),
                   None if novelty is None else float(novelty))


@dataclass
class UnitResult:
    """A finished unit: its classified images, or the problem that stopped it."""

    unit: WorkUnit
    images: list[ImageRecord] = field(default_factory=list)
    problem: Problem | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"unit": self.unit.to_json(), "images": [i.to_json() for i in self.images]}
        if self.problem:
            d["problem"] = {"status": self.problem.status, "reason": self.problem.reason, "key": self.problem.key}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "UnitResult":
        p = d.get("problem")
        return cls(WorkUnit.from_json(d["unit"]), [ImageRecord.from_json(i) for i in d["images"]],
                   Problem(p["status"], p["reason"], p.get("key", "")) if p else None)
