"""Novelty: how far an image lies from the images a version learned from, and whether a whole cohort does.

The trust gate's verdicts (``mammoflag.card``) are earned on validation images drawn from the labelled
pool. A cohort from another site, vendor or protocol can look different enough that they say nothing
about it; a manufacturer name the validation never held is one sign of that (``flagger.reliability``),
and this is the other, read off the images themselves:

- Every served ONNX model has a second output, ``embedding`` (``mammoflag.inference.EMBEDDING_OUTPUT``): the pooled
  whole-image features its classifier reads (``training/export.py``).
- Training keeps the embeddings of its training images, standardised per feature by their own mean and
  spread (:class:`NoveltyReference`, one file per served ONNX file: INT8 features are not fp32's).
- An image's **novelty** is its distance to the nearest training image divided by the *reference
  distance*: the k-th largest of the validation images' own nearest distances, k = ceil(0.05 (n + 1)).
  Novelty above 1: farther from everything the model learned from than all but the ~5 % farthest
  held-out validation images.
- Validation images are held out from training by patient, as a new cohort's images are. If a cohort
  came from where the labels came from, its images and the validation images are exchangeable, and then,
  whatever the features mean, the share of its images beyond the reference distance follows
  Beta(k, n + 1 - k) (the conformal argument: the spread is that of the few validation images the
  reference rests on), with binomial noise on top for a small cohort: a beta-binomial.
  :func:`shift_test` gives the chance of a share at least as large as the cohort's under that law;
  below ``SHIFT_ALPHA`` the cohort does not look like what the verdicts were earned on.
- Images of one patient are alike, so the law's spread is an underestimate; ``SHIFT_ALPHA`` is small for
  that reason. Active learning labels the pool's unusual images, which spreads the validation images
  wider than the archive they came from: that errs towards silence, not towards a false alarm.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NOVELTY_QUANTILE = 0.05  # the share of validation images beyond the reference distance
SHIFT_ALPHA = 1e-3
MIN_VALIDATION = 10  # fewer validation images than this: no reference (k would be the largest of a handful)


def novelty_path(version_dir: Path, model_file: str | Path) -> Path:
    """Where a served ONNX file's reference lives: ``model.int8.onnx`` -> ``model.int8.novelty.npz``."""
    return Path(version_dir) / f"{Path(model_file).name.removesuffix('.onnx')}.novelty.npz"


def nearest_distances(points: np.ndarray, reference: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Euclidean distance from each row of ``points`` to its nearest row of ``reference``."""
    points = np.asarray(points, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    ref_sq = (ref ** 2).sum(axis=1)
    out = np.empty(len(points))
    for i in range(0, len(points), chunk):
        p = points[i:i + chunk]
        d2 = (p ** 2).sum(axis=1)[:, None] + ref_sq[None, :] - 2.0 * p @ ref.T
        out[i:i + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


@dataclass(frozen=True)
class NoveltyReference:
    """A served model's training embeddings (standardised) and the validation's reference distance."""

    model_file: str  # the ONNX file whose ``embedding`` output these are
    train: np.ndarray  # (R, D) standardised training embeddings
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    reference_distance: float
    k: int  # validation images at or beyond the reference distance
    n_validation: int

    def standardise(self, embeddings: np.ndarray) -> np.ndarray:
        return (np.asarray(embeddings, dtype=np.float64) - self.mean) / self.scale

    def novelty(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) nearest-training-image distance over the reference distance (> 1: beyond)."""
        if len(embeddings) == 0:
            return np.zeros(0)
        return nearest_distances(self.standardise(embeddings), self.train) / self.reference_distance

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, train=self.train.astype(np.float32), mean=self.mean, scale=self.scale,
                 meta=np.array([self.reference_distance, self.k, self.n_validation], dtype=np.float64),
                 model_file=np.array(self.model_file))
        from mammoflag.fileio import atomic_write

        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "NoveltyReference":
        with np.load(path, allow_pickle=False) as z:
            distance, k, n = (float(v) for v in z["meta"])
            return cls(str(z["model_file"]), z["train"].astype(np.float64), z["mean"], z["scale"], distance,
                       int(k), int(n))


def fit_reference(model_file: str, train_embeddings: np.ndarray, valid_embeddings: np.ndarray) -> NoveltyReference:
    """The reference of one served model from its training and validation images' embeddings.

    Raises ValueError when there are too few validation images (``MIN_VALIDATION``) or training images.
    """
    train_embeddings = np.asarray(train_embeddings, dtype=np.float64)
    n = len(valid_embeddings)
    if n < MIN_VALIDATION or len(train_embeddings) < 2:
        raise ValueError(f"novelty needs at least {MIN_VALIDATION} validation and 2 training images "
                         f"(have {n} and {len(train_embeddings)})")
    mean = train_embeddings.mean(axis=0)
    # a feature constant over the training images (a dead channel) must not divide by zero; its spread is
    # taken as the typical one, so a cohort that lights it up still reads as far away
    spread = train_embeddings.std(axis=0)
    typical = float(np.median(spread[spread > 0])) if np.any(spread > 0) else 1.0
    scale = np.where(spread > 1e-6 * typical, spread, typical)
    train = (train_embeddings - mean) / scale
    distances = np.sort(nearest_distances((np.asarray(valid_embeddings, dtype=np.float64) - mean) / scale, train))
    k = max(1, math.ceil(NOVELTY_QUANTILE * (n + 1)))
    reference = float(distances[-k])
    if not reference > 0:
        raise ValueError("validation images coincide with training images: no reference distance")
    return NoveltyReference(model_file, train, mean, scale, reference, k, n)


@dataclass(frozen=True)
class ShiftTest:
    """A cohort's images beyond the reference distance against what its validation predicts."""

    images: int
    beyond: int
    k: int
    n_validation: int
    p_value: float

    @property
    def expected_rate(self) -> float:
        return self.k / (self.n_validation + 1)

    @property
    def rate(self) -> float:
        return self.beyond / self.images if self.images else 0.0

    @property
    def shifted(self) -> bool:
        return self.p_value < SHIFT_ALPHA

    def explain(self) -> str:
        share = (f"{self.beyond} of {self.images} images ({100 * self.rate:.1f} %) lie farther from every training "
                 f"image than the distance only {self.k} of the {self.n_validation} validation images reach "
                 f"(about {100 * self.expected_rate:.0f} % expected from where the labels came from")
        if self.shifted:
            return (share + f"; p = {self.p_value:.2g}): this cohort does not look like the images the trust gate "
                    "judged, so its verdicts do not speak for it: label some of its images (the most novel first: "
                    "images.csv's novelty column) and retrain before trusting its flags")
        return share + f"; p = {self.p_value:.2g}): no sign that it differs from them"


def shift_test(images: int, beyond: int, k: int, n_validation: int) -> ShiftTest:
    """P(at least ``beyond`` of ``images`` beyond the reference) under the beta-binomial of the module's text."""
    from scipy.stats import betabinom

    if images <= 0 or beyond <= 0:
        p = 1.0
    else:
        p = float(betabinom.sf(beyond - 1, images, k, n_validation + 1 - k))
    return ShiftTest(images, beyond, k, n_validation, min(1.0, max(0.0, p)))


def cohort_shift(version_dir: Path, model_file: str, images: int, novel: int) -> ShiftTest | None:
    """The shift test of a run's ``images`` scored for novelty, ``novel`` of them beyond the reference, against
    the reference the version kept for ``model_file`` (None when nothing was scored or it kept none)."""
    path = novelty_path(version_dir, model_file)
    if images == 0 or not path.exists():
        return None
    reference = NoveltyReference.load(path)
    return shift_test(images, novel, reference.k, reference.n_validation)
