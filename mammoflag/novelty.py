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
  That test sees a cohort with a tail of unlike images, but k is a handful of images, so it needs a large
  share beyond to speak.
- A cohort moved as a whole (another site's processing) is seen better by ranks: each study's mean
  novelty against each validation patient's (:class:`RankSum`, a one-sided Mann-Whitney test by the normal
  approximation, streamed: one count per study). Studies and patients are the units, so images of one
  patient being alike does not fool it.
- :func:`shift_test` gives both p-values; the cohort is called unlike what the verdicts were earned on when
  either is below ``SHIFT_ALPHA`` / 2 (Bonferroni). Images of one patient are alike, so the tail law's
  spread is an underestimate; ``SHIFT_ALPHA`` is small for that reason. Active learning labels the pool's
  unusual images, which spreads the validation images wider than the archive they came from: that errs
  towards silence, not towards a false alarm.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mammoflag.fileio import atomic_write

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
    # each validation patient's mean novelty, sorted (the rank test's reference; empty: no rank test)
    patient_means: np.ndarray = field(default_factory=lambda: np.zeros(0))

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
                 model_file=np.array(self.model_file), patient_means=self.patient_means)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "NoveltyReference":
        with np.load(path, allow_pickle=False) as z:
            distance, k, n = (float(v) for v in z["meta"])
            means = z["patient_means"] if "patient_means" in z.files else np.zeros(0)
            return cls(str(z["model_file"]), z["train"].astype(np.float64), z["mean"], z["scale"], distance,
                       int(k), int(n), np.sort(means.astype(np.float64)))


def fit_reference(model_file: str, train_embeddings: np.ndarray, valid_embeddings: np.ndarray,
                  valid_groups: np.ndarray | None = None) -> NoveltyReference:
    """The reference of one served model from its training and validation images' embeddings
    (``valid_groups``: each validation image's patient; None: every image its own).

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
    distances = nearest_distances((np.asarray(valid_embeddings, dtype=np.float64) - mean) / scale, train)
    k = max(1, math.ceil(NOVELTY_QUANTILE * (n + 1)))
    reference = float(np.sort(distances)[-k])
    if not reference > 0:
        raise ValueError("validation images coincide with training images: no reference distance")
    groups = np.arange(n) if valid_groups is None else np.asarray([str(g) for g in valid_groups])
    _, index = np.unique(groups, return_inverse=True)
    patient_means = np.bincount(index, weights=distances / reference) / np.bincount(index)
    return NoveltyReference(model_file, train, mean, scale, reference, k, n, np.sort(patient_means))


@dataclass
class RankSum:
    """Mann-Whitney U of a cohort's study means against the validation's patient means, one study at a time."""

    reference: np.ndarray  # sorted patient means
    studies: int = 0
    u: float = 0.0  # pairs (study, patient) with the study's mean above the patient's, ties counted half

    def add(self, study_mean: float, count: int = 1) -> None:
        below = np.searchsorted(self.reference, study_mean, side="left")
        at_or_below = np.searchsorted(self.reference, study_mean, side="right")
        self.studies += count
        self.u += count * float(below + at_or_below) / 2.0

    def p_value(self) -> float | None:
        """One-sided (the cohort's studies lie farther), normal approximation with continuity correction; None
        with fewer than 5 studies or validation patients (too few for the approximation)."""
        s, g = self.studies, len(self.reference)
        if s < 5 or g < 5:
            return None
        z = (self.u - s * g / 2.0 - 0.5) / math.sqrt(s * g * (s + g + 1) / 12.0)
        return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class ShiftTest:
    """A cohort against its version's validation: the tail test (images beyond the reference distance) and the
    rank test (studies' mean novelty against the validation patients')."""

    images: int
    beyond: int
    k: int
    n_validation: int
    p_value: float  # the tail test's
    studies: int = 0
    patients: int = 0
    rank_p: float | None = None  # the rank test's (None: not enough studies or patients, or no reference)

    @property
    def expected_rate(self) -> float:
        return self.k / (self.n_validation + 1)

    @property
    def rate(self) -> float:
        return self.beyond / self.images if self.images else 0.0

    @property
    def shifted(self) -> bool:
        if self.rank_p is None:
            return self.p_value < SHIFT_ALPHA
        return min(self.p_value, self.rank_p) < SHIFT_ALPHA / 2

    def explain(self) -> str:
        text = (f"{self.beyond} of {self.images} images ({100 * self.rate:.1f} %) lie farther from every training "
                f"image than the distance only {self.k} of the {self.n_validation} validation images reach (about "
                f"{100 * self.expected_rate:.0f} % expected from where the labels came from; p = {self.p_value:.2g})")
        if self.rank_p is not None:
            text += (f"; the {self.studies} studies' mean novelty against the {self.patients} validation patients': "
                     f"p = {self.rank_p:.2g} that they lie this far by chance")
        if self.shifted:
            return (text + ": this cohort does not look like the images the trust gate judged, so its verdicts do "
                    "not speak for it: label some of its images (the most novel first: images.csv's novelty column) "
                    "and retrain before trusting its flags")
        return text + ": no sign that it differs from them"


def betabinom_sf(at_least: int, m: int, a: float, b: float) -> float:
    """P(X >= ``at_least``) for X ~ BetaBinomial(m, a, b), summed exactly from the pmf's recurrence in numpy
    (scipy.stats would do it too, but importing it costs a flagging run over a second)."""
    if at_least <= 0:
        return 1.0
    if at_least > m:
        return 0.0

    def lbeta(p: float, q: float) -> float:
        return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)

    first = (math.lgamma(m + 1) - math.lgamma(at_least + 1) - math.lgamma(m - at_least + 1)
             + lbeta(at_least + a, m - at_least + b) - lbeta(a, b))
    x = np.arange(at_least, m, dtype=np.float64)  # pmf(x + 1) / pmf(x) for each x of the tail but the last
    steps = np.log((m - x) / (x + 1.0)) + np.log((x + a) / (m - x - 1.0 + b))
    logs = first + np.concatenate([[0.0], np.cumsum(steps)])
    top = float(logs.max())
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def study_mean(novelty: Sequence[float]) -> float:
    """A study's mean novelty as the tests count it: of the values as written (3 decimals), to 3 decimals."""
    return round(sum(round(n, 3) for n in novelty) / len(novelty), 3)


def shift_test(images: int, beyond: int, reference: NoveltyReference,
               study_means: Mapping[float, int] | None = None) -> ShiftTest:
    """Both tests of the module's text: ``beyond`` of ``images`` under the beta-binomial, and, when
    ``study_means`` (study mean novelty -> number of studies) is given, the rank test."""
    k, n = reference.k, reference.n_validation
    p = 1.0 if images <= 0 or beyond <= 0 else betabinom_sf(beyond, images, k, n + 1 - k)
    ranks = RankSum(reference.patient_means)
    for mean, count in (study_means or {}).items():
        ranks.add(mean, count)
    return ShiftTest(images, beyond, k, n, min(1.0, max(0.0, p)), ranks.studies, len(reference.patient_means),
                     ranks.p_value())


def cohort_shift(version_dir: Path, model_file: str, images: int, novel: int,
                 study_means: Mapping[float, int] | None = None) -> ShiftTest | None:
    """The shift test of a run's ``images`` scored for novelty (``novel`` of them beyond the reference; each
    study's ``study_mean``, counted) against the reference the version kept for ``model_file`` (None when
    nothing was scored or it kept none)."""
    path = novelty_path(version_dir, model_file)
    if images == 0 or not path.exists():
        return None
    return shift_test(images, novel, NoveltyReference.load(path), study_means)
