"""The versioned model registry: one folder per version, a ``current`` pointer moved atomically.

Layout under the models directory::

    models/
      current                 # a one-line file naming the current version (replaced atomically)
      v0003-20261122T101500/  # one folder per version
        model.onnx            # fp32, dynamic batch
        model.int8.onnx       # static INT8 (QDQ), only when it kept validation AUROC
        model.json            # the model card: spec, metrics, labels, fingerprint, parent, time
        plots/*.png
      .staging-<uuid>/        # a version being written; never read, swept on the next publish

A version folder appears only by ``os.rename`` of a complete staging folder, and the
pointer only by ``os.replace`` of a complete file, so a worker killed at any moment
leaves either the old state or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from mammoflag.fileio import atomic_write, atomic_write_json
from mammoflag.card import ModelCard
from mammoflag.spec import ModelSpec

CARD_FILE = "model.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CURRENT_FILE = "current"
_VERSION_RE = re.compile(r"^v(\d{4,})-")


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelVersion:
    """A registered version: its folder and its model card."""

    path: Path
    card: ModelCard

    @property
    def name(self) -> str:
        return self.card.version

    def model_file(self, prefer_int8: bool = True) -> Path:
        """The ONNX file to serve: INT8 when preferred and kept, else fp32 (one rule for every consumer)."""
        return (self.int8_path if prefer_int8 else None) or self.onnx_path

    @property
    def spec(self) -> ModelSpec:
        return self.card.spec

    @property
    def onnx_path(self) -> Path:
        return self.path / FP32_FILE

    @property
    def int8_path(self) -> Path | None:
        p = self.path / INT8_FILE
        return p if self.card.int8.kept and p.exists() else None


def read_version(path: Path) -> ModelVersion:
    card_path = Path(path) / CARD_FILE
    try:
        card = ModelCard.from_json(json.loads(card_path.read_text()))
    except FileNotFoundError as exc:
        raise RegistryError(f"{card_path}: no model card; not a model version folder") from exc
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{card_path}: model card is not valid JSON ({exc})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{card_path}: not a mammoflag model card ({type(exc).__name__}: {exc})") from exc
    if not card.version:
        card = replace(card, version=Path(path).name)
    return ModelVersion(Path(path), card)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading -----------------------------------------------------------------------------
    def versions(self) -> list[ModelVersion]:
        if not self.root.exists():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and _VERSION_RE.match(p.name) and (p / CARD_FILE).exists():
                out.append(read_version(p))
        return out

    def current_name(self) -> str | None:
        try:
            name = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def current(self) -> ModelVersion | None:
        name = self.current_name()
        return read_version(self.root / name) if name else None

    def get(self, name: str) -> ModelVersion:
        return read_version(self.root / name)

    def next_version_name(self) -> str:
        numbers = [int(m.group(1)) for p in (self.root.iterdir() if self.root.exists() else [])
                   if (m := _VERSION_RE.match(p.name))]
        n = max(numbers, default=0) + 1
        return f"v{n:04d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder for a version being built; removed unless published."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".staging-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staging_dir: Path, card: ModelCard) -> ModelVersion:
        """Write the card into the staging folder and rename it into place as a new version."""
        self._sweep_stale_staging(keep=staging_dir)
        name = self.next_version_name()
        atomic_write_json(staging_dir / CARD_FILE, replace(card, version=name).to_json())
        _fsync_dir(staging_dir)
        final = self.root / name
        os.rename(staging_dir, final)  # atomic on one filesystem
        _fsync_dir(self.root)
        return read_version(final)

    def set_current(self, name: str) -> None:
        if not (self.root / name / CARD_FILE).exists():
            raise RegistryError(f"cannot point current at {name}: no such version")
        atomic_write(self.root / CURRENT_FILE, name + "\n")
        _fsync_dir(self.root)

    def _sweep_stale_staging(self, keep: Path, older_than_s: float = 6 * 3600) -> None:
        now = time.time()
        for p in self.root.glob(".staging-*"):
            if p != keep and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)


def resolve_model(path: str | Path) -> ModelVersion:
    """A version folder, or a registry folder (then its current version)."""
    p = Path(path)
    if (p / CARD_FILE).exists():
        return read_version(p)
    current = Registry(p).current()
    if current is None:
        raise RegistryError(f"{p}: neither a model version folder nor a registry with a current version")
    return current


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
