"""The prediction core of the ML backend: the current model, and tasks -> Label Studio predictions.

Two pieces, both free of HTTP:

- :class:`CurrentModel` holds the registry's current version, loaded once. A request asks it
  for the model; at most every ``check_every_s`` seconds it stats the registry's ``current``
  pointer (one ``os.stat``, no file read) and, only when that changed, loads the new version.
  While one thread loads, the others keep answering with the model they already have.
- :func:`predict_tasks` turns Label Studio tasks into one prediction per task, in order: a
  ``choices`` result, the model version, a confidence ``score`` (low = unsure, Label Studio's
  uncertainty sampling serves the lowest first) and the calibrated per-class probabilities.
  A task whose image cannot be read gets an error entry of its own; the others are unaffected.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from label_config import LabelConfig
from mammoflag.header_evidence import header_evidence
from mammoflag.inference import OnnxClassifier, as_prob_dict, choices_for, uncertainty_score
from mammoflag.paths import UnsafeImagePath, resolve_task_image
from mammoflag.preprocess import load_display_image, model_input
from mammoflag.registry import CURRENT_FILE, Registry, RegistryError
from mammoflag.spec import ModelSpec, SpecMismatch
from ml_backend.diversity import average_hash

log = logging.getLogger(__name__)

# Images decoded and run through the model together; bounds memory for a large /predict batch.
PREDICT_CHUNK = 32
# Display PNGs have a long side of at most ~1024-2048 px; a PNG declaring more pixels than this is
# refused before it is decoded (a 190 KB PNG can declare 196 megapixels).
MAX_TASK_IMAGE_PIXELS = 16_000_000
# Per-task failures logged one by one per call; the rest are counted in one line.
MAX_LOGGED_TASK_ERRORS = 5
# The model_version of the empty predictions answered while there is no model. Label Studio needs
# one (a null model_version makes its task API fail with 400); no registry version looks like it.
NO_MODEL_VERSION = "no-model-yet"


class CurrentModel:
    """The registry's current version, loaded once and swapped when the ``current`` pointer moves."""

    def __init__(self, registry: Registry, label_config: LabelConfig, check_every_s: float = 2.0,
                 threads: int | None = None):
        self.registry = registry
        self.label_config = label_config
        self.check_every_s = check_every_s
        self.threads = threads
        self._model: OnnxClassifier | None = None
        self._pointer_stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._why_none = "no model version has been checked yet"
        self._load_lock = threading.Lock()

    @property
    def why_none(self) -> str:
        """Why :meth:`get` returns None (for the log line)."""
        return self._why_none

    @property
    def loaded(self) -> OnnxClassifier | None:
        """The model in service now, without checking the registry (for /health: it has 1 s)."""
        return self._model

    def get(self) -> OnnxClassifier | None:
        """The model to predict with; None when the registry has no usable current version."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_every_s
            stamp = self._stamp()
            if stamp != self._pointer_stamp:
                self._reload(stamp)
        return self._model

    def load_now(self) -> OnnxClassifier | None:
        """Load the current version at once (application start-up)."""
        self._next_check = time.monotonic() + self.check_every_s
        self._reload(self._stamp(), wait=True)
        return self._model

    def _stamp(self) -> tuple[int, int, int] | None:
        # set_current() replaces the pointer file with os.replace, so a move shows up as a new
        # inode; mtime and size catch an editor rewriting it in place.
        try:
            st = os.stat(self.registry.root / CURRENT_FILE)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self, stamp: tuple[int, int, int] | None, wait: bool = False) -> None:
        if not self._load_lock.acquire(blocking=wait):
            return  # another thread is loading; keep serving the model we have
        try:
            self._pointer_stamp = stamp
            name = self.registry.current_name()
            if name is None:
                self._model, self._why_none = None, f"the model registry has no current version yet ({self.registry.root})"
                log.warning("no model: %s", self._why_none)
                return
            if self._model is not None and self._model.name == name:
                return
            try:
                version = self.registry.get(name)
                version.spec.check_compatible(self.label_config)
                model = OnnxClassifier(version, threads=self.threads)
            except (RegistryError, SpecMismatch, OSError, ValueError) as exc:
                # Keep the previous model (if any): a broken version must not take the backend down.
                self._why_none = f"model version {name} cannot be used: {exc}"
                log.error("%s; still serving %s", self._why_none, self._model.name if self._model else "nothing")
                return
            previous = self._model.name if self._model else None
            self._model = model
            log.info("serving model version %s (was %s)", name, previous)
        finally:
            self._load_lock.release()


@dataclass(frozen=True)
class TaskPrediction:
    """One task's answer to Label Studio: a prediction, or an error saying why there is none."""

    task_id: int | None
    result: list[dict[str, Any]] = field(default_factory=list)
    score: float | None = None
    model_version: str | None = None
    probabilities: Mapping[str, float] | None = None
    error: str | None = None
    image_hash: bytes | None = field(default=None, repr=False)  # for diversity (re-prediction only)

    def to_label_studio(self) -> dict[str, Any]:
        """The item of ``/predict``'s ``results`` list.

        An errored task has no ``result`` key: Label Studio then stores nothing for it (rather than an
        empty prediction that would rank it in uncertainty sampling) and logs the entry.
        """
        if self.error is not None:
            return {"task": self.task_id, "error": self.error, "model_version": self.model_version}
        out: dict[str, Any] = {"result": self.result}
        if self.model_version is not None:
            out["model_version"] = self.model_version
        if self.score is not None:
            out["score"] = self.score
        if self.probabilities is not None:
            out["probabilities"] = dict(self.probabilities)
        return out


def choices_result(choices: Sequence[str], from_name: str, to_name: str) -> dict[str, Any]:
    """A Label Studio ``choices`` result item."""
    return {"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": list(choices)}}


class TaskImageError(ValueError):
    """A task whose image cannot be used; the message is safe to log and return."""


def _task_id(task: Any) -> int | None:
    """The task's id when it is an integer (anything else is never echoed back)."""
    value = task.get("id") if isinstance(task, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_task_image(task: Mapping[str, Any], image_key: str, data_root: Path) -> np.ndarray:
    """The display image a task names, read only from below the data root.

    Errors name the task and the data field but never echo the URL or path: a path could carry a
    patient's name if someone imported files named so. Every way a hostile task can go wrong
    (``data`` not an object, a NUL byte or a 5,000-character name in the path, a PNG that declares
    hundreds of megapixels) is a TaskImageError of that task alone.
    """
    return read_task_image(task, image_key, task_image_path(task, image_key, data_root))


def task_image_path(task: Mapping[str, Any], image_key: str, data_root: Path) -> Path:
    """The existing file below the data root that a task's image URL names (TaskImageError otherwise)."""
    task_id = _task_id(task)
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        raise TaskImageError(f"task {task_id}: data is missing or not an object")
    url = data.get(image_key)
    if not isinstance(url, str) or not url:
        raise TaskImageError(f"task {task_id}: data.{image_key} is missing or not a string")
    try:
        path = resolve_task_image(url, data_root)
        exists = path.is_file()
    except (UnsafeImagePath, ValueError):  # ValueError: a NUL byte in the path
        raise TaskImageError(f"task {task_id}: data.{image_key} is not a /data/local-files/ URL below the data root; "
                             "refused") from None
    except OSError as exc:  # ENAMETOOLONG, ELOOP ...: the message would carry the path
        raise TaskImageError(f"task {task_id}: data.{image_key} names no usable file ({type(exc).__name__})") from None
    if not exists:
        raise TaskImageError(f"task {task_id}: data.{image_key} names a file that does not exist under the data root")
    return path


def read_task_image(task: Mapping[str, Any], image_key: str, path: Path) -> np.ndarray:
    """The display image at ``path`` (from :func:`task_image_path`), refused from its header when too large."""
    task_id = _task_id(task)
    try:
        _check_pixel_count(path)
        return load_display_image(path)
    except TaskImageError as exc:
        raise TaskImageError(f"task {task_id}: data.{image_key} {exc}") from None
    except Exception as exc:  # OSError, ValueError, PIL's DecompressionBombError, a decoder's own errors
        raise TaskImageError(f"task {task_id}: data.{image_key} is not a readable image ({type(exc).__name__})") from None


def _check_pixel_count(path: Path) -> None:
    """Refuse, from the header alone, an image larger than any display PNG (no pixel is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # lazy: reads the header only
            width, height = im.size
    except Image.DecompressionBombError:  # Pillow's own guard (over 2 x its MAX_IMAGE_PIXELS) fired first
        raise TaskImageError(f"is too large: over {MAX_TASK_IMAGE_PIXELS / 1e6:.0f} megapixels") from None
    if width * height > MAX_TASK_IMAGE_PIXELS:
        raise TaskImageError(f"is too large: {width * height / 1e6:.0f} megapixels, the limit is "
                             f"{MAX_TASK_IMAGE_PIXELS / 1e6:.0f}")


@dataclass(frozen=True)
class InputCache:
    """Model inputs of display images, kept between re-prediction rounds (a pool's tasks are predicted
    by every new version; their decoded, preprocessed input does not change).

    One file per image below ``root`` (named by a hash of its path), holding the model input, the
    image's average hash and the PNG's (size, mtime) it was made from: a rewritten PNG misses. The
    folder is per preprocessing version and input size, so a new ``model_input`` never reads an old
    entry. :meth:`keep` removes every entry but those of the given paths (the pool after a round), so
    between rounds the cache holds at most one entry per unlabeled pool task (~330 KB each at 256 px;
    during a round, the window's candidates too).
    """

    root: Path

    @classmethod
    def for_spec(cls, base: Path, spec: ModelSpec) -> "InputCache":
        return cls(Path(base) / f"{spec.preprocessing_version}-{spec.input_size}px")

    def entry(self, path: Path) -> Path:
        return self.root / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".npz")

    def get(self, path: Path) -> tuple[np.ndarray, bytes] | None:
        try:
            st = path.stat()
            with np.load(self.entry(path)) as z:
                if tuple(z["stamp"]) != (st.st_size, st.st_mtime_ns):
                    return None
                return z["input"], z["hash"].tobytes()
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def put(self, path: Path, model_in: np.ndarray, image_hash: bytes) -> None:
        try:
            st = path.stat()
            self.root.mkdir(parents=True, exist_ok=True)
            target = self.entry(path)
            tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, input=model_in, hash=np.frombuffer(image_hash, dtype=np.uint8),
                     stamp=np.array([st.st_size, st.st_mtime_ns], dtype=np.int64))
            os.replace(tmp, target)
        except OSError as exc:  # a full disk costs speed, never a prediction
            log.warning("model input cache: %s", type(exc).__name__)

    def keep(self, paths: Sequence[Path]) -> int:
        """Remove every entry but those of ``paths``; returns how many were removed."""
        wanted = {self.entry(p).name for p in paths}
        removed = 0
        for f in self.root.glob("*.npz") if self.root.is_dir() else ():
            if f.name not in wanted:
                f.unlink(missing_ok=True)
                removed += 1
        return removed


def _make_input(task: Mapping[str, Any], spec: ModelSpec, path: Path, cache: InputCache | None,
                with_image_hash: bool) -> tuple[np.ndarray, bytes]:
    """(model input, average hash or b"") of a task's image, made from its PNG (and put in ``cache``)."""
    display = read_task_image(task, spec.image_key, path)
    try:
        model_in = model_input(display, spec.input_size)
    except Exception as exc:  # this image alone: never the whole batch
        raise TaskImageError(f"task {_task_id(task)}: data.{spec.image_key} could not be made into "
                             f"a model input ({type(exc).__name__})") from None
    image_hash = average_hash(display) if with_image_hash or cache is not None else None
    if cache is not None and image_hash is not None:
        cache.put(path, model_in, image_hash)
    return model_in, image_hash or b""


def warm_input_cache(tasks: Sequence[Mapping[str, Any]], spec: ModelSpec, data_root: Path, cache: InputCache) -> int:
    """Put the model inputs of the tasks' images in ``cache`` ahead of any model (a new pool: annotators
    label its first round while this runs, and the first version's round then reads them); returns how
    many entries were made. A task whose image cannot be used is passed over: its round reports it."""
    made = 0
    for task in tasks:
        try:
            path = task_image_path(task, spec.image_key, data_root)
            if cache.get(path) is None:
                _make_input(task, spec, path, cache, with_image_hash=True)
                made += 1
        except TaskImageError:
            continue
    return made


def predict_tasks(tasks: Sequence[Mapping[str, Any]], model: OnnxClassifier | None, data_root: Path,
                  chunk: int = PREDICT_CHUNK, with_image_hash: bool = False,
                  cache: InputCache | None = None) -> list[TaskPrediction]:
    """One :class:`TaskPrediction` per task, in the order given (with the image's average hash if asked;
    with ``cache``, the model input and hash of an image seen before are read instead of made)."""
    if model is None:
        return [TaskPrediction(task_id=_task_id(t), model_version=NO_MODEL_VERSION) for t in tasks]
    spec, version = model.spec, model.name
    out: list[TaskPrediction] = []
    failed = 0
    for start in range(0, len(tasks), chunk):
        batch = tasks[start : start + chunk]
        inputs: list[np.ndarray] = []
        headers: list[np.ndarray] = []  # each task's header evidence, from the hints in its data
        hashes: list[bytes | None] = []
        slots: list[TaskPrediction | None] = []
        for task in batch:
            try:
                path = task_image_path(task, spec.image_key, data_root)
                hit = cache.get(path) if cache is not None else None
                if hit is None:
                    hit = _make_input(task, spec, path, cache, with_image_hash)
                inputs.append(hit[0])
                headers.append(header_evidence(task.get("data")))
                hashes.append(hit[1] if with_image_hash else None)
                slots.append(None)
            except TaskImageError as exc:
                failed += 1
                if failed <= MAX_LOGGED_TASK_ERRORS:  # a million bad tasks must not write a million lines
                    log.warning("%s", exc)
                slots.append(TaskPrediction(task_id=_task_id(task), model_version=version, error=str(exc)))
        probs = model.probabilities(np.stack(inputs), np.stack(headers)) if inputs else np.zeros((0, len(spec.classes)))
        scores = uncertainty_score(probs) if len(probs) else np.zeros(0)
        rows = iter(range(len(inputs)))
        for task, slot in zip(batch, slots):
            if slot is not None:
                out.append(slot)
                continue
            i = next(rows)
            out.append(TaskPrediction(
                task_id=_task_id(task),
                result=[choices_result(choices_for(probs[i], spec), spec.choices_name, spec.image_name)],
                score=round(float(scores[i]), 6),
                model_version=version,
                probabilities={k: round(v, 6) for k, v in as_prob_dict(probs[i], spec).items()},
                image_hash=hashes[i],
            ))
    if failed > MAX_LOGGED_TASK_ERRORS:
        log.warning("... and %d more task(s) whose image could not be used", failed - MAX_LOGGED_TASK_ERRORS)
    return out
