"""Calibration and validation metrics for a multi-label model.

Everything here works on plain arrays: ``logits`` (N, C) and ``targets`` (N, C) of 0/1.

- Temperature scaling per class: one scalar T_c fitted on validation by minimising the
  binary log-loss of ``sigmoid(logit / T_c)``. It changes confidence, never the ranking
  (AUROC is unchanged).
- Header evidence per class (``fit_header_weights``): with the temperature fixed, an L2-penalised
  logistic regression of the targets on the image's header features (``mammoflag.header_evidence``)
  with ``logit / T`` as its offset: how far each header feature moves the calibrated logit. Only for
  classes the header alone ranks (``classes_told_by_header``, over every labelled image). An image
  whose header says nothing keeps the image model's probability.
- Thresholds per class for a target sensitivity (default 0.95): the highest threshold that
  still catches that share of the validation positives. Missing a biopsy clip costs more
  than reviewing a false positive. With header weights, the threshold is the image alone's and the
  intercept of images whose header speaks is set so that it catches that share of theirs too.
- Metrics: AUROC, sensitivity and specificity at the threshold with Wilson 95% intervals,
  expected calibration error, confusion counts, label counts; reliability and ROC plots.
- Per vendor: the same metrics for each manufacturer's validation images (``metrics_by``).
- Out of fold: the same numbers without the optimism of judging a threshold on the images it
  was chosen on. The validation patients are split in two; each half is scored with the
  temperature and threshold fitted on the other half (``out_of_fold_metrics``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mammoflag.card import (UNKNOWN_MANUFACTURER, ClassMetrics, Confusion, DecisionMetrics, GroupMetrics, OutOfFold,
                            OutOfFoldReliability, ValidationMetrics)
from mammoflag.header_evidence import HEADER_FEATURES, weight_matrix
from mammoflag.inference import fused_logits, sigmoid
from mammoflag.spec import ModelSpec
from mammoflag.stats import (Z_95, expected_calibration_error, reliability_curve,  # noqa: F401 (re-exported)
                             wilson_interval)

TEMPERATURE_BOUNDS = (0.05, 20.0)


def binary_log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(targets, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising log-loss for one class (1.0 when the data cannot say: one class only)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if len(z) == 0 or y.min() == y.max():
        return 1.0
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    best = minimize_scalar(lambda log_t: binary_log_loss(sigmoid(z / math.exp(log_t)), y),
                           bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def threshold_for_sensitivity(probs: np.ndarray, targets: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold t with sensitivity(p >= t) >= target; 0.5 when there are no positives."""
    p = np.asarray(probs, dtype=np.float64)
    positives = np.sort(p[np.asarray(targets) > 0.5])[::-1]
    if len(positives) == 0:
        return 0.5
    needed = max(1, math.ceil(target_sensitivity * len(positives) - 1e-9))
    kth = positives[needed - 1]
    # Halfway to the next lower score (any image): the same decisions on validation, but a
    # positive scored a hair lower at serving time (INT8, another machine) is still caught.
    below = p[p < kth]
    return float((kth + below.max()) / 2) if len(below) else float(kth)


def auroc(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when validation has only one class."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(p)  # average ranks: ties count half (Mann-Whitney U)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# L2 penalty of the header weights (on the summed log-loss): a feature every validation positive shares and
# no negative does gets a weight of ~3 (an odds ratio of ~20), not infinity; one that says nothing stays near 0.
HEADER_L2 = 0.3


def fit_header_weights(offset: np.ndarray, header: np.ndarray, targets: np.ndarray,
                       l2: float = HEADER_L2) -> np.ndarray:
    """(F,) weights minimising the log-loss of ``sigmoid(offset + header @ w)`` plus ``l2 / 2 * |w|^2``.

    ``offset`` is the calibrated image logit, so the weights say only what the header adds to the
    image. Zeros when the targets are one class only or no feature is ever non-zero."""
    from scipy.optimize import minimize

    h = np.asarray(header, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    z = np.asarray(offset, dtype=np.float64)
    w0 = np.zeros(h.shape[1])
    if len(y) == 0 or y.min() == y.max() or not np.any(h):
        return w0

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        a = z + h @ w
        # log(1 + e^a) - y a, stably; its gradient is (sigmoid(a) - y) h
        value = float(np.sum(np.logaddexp(0.0, a) - y * a) + 0.5 * l2 * w @ w)
        return value, h.T @ (sigmoid(a) - y) + l2 * w

    return np.asarray(minimize(loss, w0, jac=True, method="L-BFGS-B").x, dtype=np.float64)


@dataclass(frozen=True)
class Calibration:
    temperatures: dict[str, float]
    thresholds: dict[str, float]
    header_weights: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # empty: image alone


# A class gets header weights only when its header alone ranks it at least this well (out of fold, over every
# labelled image: the network never sees the header, so training images are fair judges of it), the trust
# gate's bar. The validation set alone cannot tell: at 350 labels it holds ~7 positives of a class, and a
# header feature two of them happen to share looks as telling as one that says the class (a biopsy_tool weight
# on the magnification code, benchmarks/results/generalisation.json). The threshold is aligned for images whose
# header speaks only when validation holds at least MIN_SPEAKING_POSITIVES of their positives: with fewer, the
# 95 % point is the weakest positive seen, and aligning on it leaves no slack for a header written a little
# differently (a magnification factor of 1.3 where validation saw only 1.8 was pushed under the threshold).
HEADER_MIN_AUROC = 0.75
HEADER_FOLDS = 5
MIN_SPEAKING_POSITIVES = 20


def _fold_of(groups: Sequence[str], folds: int, salt: str = "") -> np.ndarray:
    """The fold of each group (patient): a hash, so a patient's images stay together. ``salt`` deals a
    split independent of the out-of-fold calibration's."""
    return np.array([int(hashlib.sha256((salt + str(g)).encode()).hexdigest()[:8], 16) % folds for g in groups])


def header_auroc(header: np.ndarray, targets: np.ndarray, groups: Sequence[str],
                 folds: int = HEADER_FOLDS) -> float | None:
    """How well the header alone ranks a class: AUROC of a header-only logistic (``fit_header_weights`` with
    no image offset), each patient fold scored by the fit on the others. None when it cannot be said (no
    header evidence, one outcome only, a fold without both outcomes to fit on)."""
    h = np.asarray(header, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if len(y) == 0 or not np.any(h) or y.min() == y.max():
        return None
    fold_of = _fold_of(groups, folds, salt="header:")
    scores = np.zeros(len(y))
    for f in set(fold_of.tolist()):
        fit, held = fold_of != f, fold_of == f
        if not fit.any() or y[fit].min() == y[fit].max():
            return None
        scores[held] = h[held] @ fit_header_weights(np.zeros(int(fit.sum())), h[fit], y[fit])
    return auroc(scores, y)


def classes_told_by_header(header: np.ndarray, targets: np.ndarray, groups: Sequence[str],
                           classes: Sequence[str]) -> dict[str, float | None]:
    """``header_auroc`` of every class, over every labelled image (training and validation)."""
    return {c: header_auroc(header, np.asarray(targets)[:, k], groups) for k, c in enumerate(classes)}


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _header_calibration(image: np.ndarray, header: np.ndarray, y: np.ndarray, target_sensitivity: float,
                        min_speaking_positives: int = MIN_SPEAKING_POSITIVES) -> tuple[tuple[float, ...], float]:
    """(header weights, threshold) of one class the header tells.

    The threshold is the image alone's (``threshold_for_sensitivity`` of ``sigmoid(logit / T)``): an
    image whose header is empty is judged as without header evidence. The weights are an L2 logistic
    fit with the image's logit as offset; then, given enough validation positives whose header speaks,
    the ``header_speaks`` weight (the intercept of those images) moves so that the same threshold catches
    the target share of *theirs* too; with fewer, the threshold is the lower of the image's and the
    fused score's, which catches the target share both ways.
    """
    threshold = threshold_for_sensitivity(sigmoid(image), y, target_sensitivity)
    w = fit_header_weights(image, header, y)
    speaks = header[:, HEADER_FEATURES.index("header_speaks")] > 0
    if int((y[speaks] > 0.5).sum()) >= min_speaking_positives:
        fused = sigmoid(image[speaks] + header[speaks] @ w)
        w[HEADER_FEATURES.index("header_speaks")] += _logit(threshold) - _logit(
            threshold_for_sensitivity(fused, y[speaks], target_sensitivity))
    else:
        threshold = min(threshold, threshold_for_sensitivity(sigmoid(image + header @ w), y, target_sensitivity))
    return tuple(float(x) for x in w), threshold


def calibrate(logits: np.ndarray, targets: np.ndarray, classes: Sequence[str],
              target_sensitivity: float, header: np.ndarray | None = None,
              header_classes: Sequence[str] = (),
              min_speaking_positives: int = MIN_SPEAKING_POSITIVES) -> Calibration:
    """Temperatures, thresholds and, for the ``header_classes`` (those the header alone ranks:
    ``classes_told_by_header``) when ``header`` (``header_matrix`` rows, HEADER_FEATURES order) is given,
    header weights (the intercept aligned given ``min_speaking_positives``: ``_header_calibration``)."""
    # float64 throughout: serving divides float64 logits by T, and near p = 1 a float32
    # division lands on a different side of a threshold fitted here
    logits = np.asarray(logits, dtype=np.float64)
    use_header = header is not None and len(header) == len(logits) and bool(np.any(header))
    temps, ths, weights = {}, {}, {}
    for k, c in enumerate(classes):
        temps[c] = fit_temperature(logits[:, k], targets[:, k])
        image = logits[:, k] / temps[c]
        if use_header and c in header_classes:
            assert header is not None
            weights[c], ths[c] = _header_calibration(image, np.asarray(header, dtype=np.float64),
                                                     np.asarray(targets[:, k], dtype=np.float64),
                                                     target_sensitivity, min_speaking_positives)
        else:
            ths[c] = threshold_for_sensitivity(sigmoid(image), targets[:, k], target_sensitivity)
    return Calibration(temps, ths, {c: w for c, w in weights.items() if any(w)})


def calibrated_spec(spec: ModelSpec, cal: Calibration) -> ModelSpec:
    """``spec`` with this calibration (header weights named by this code's ``HEADER_FEATURES``)."""
    return spec.with_calibration(cal.temperatures, cal.thresholds, HEADER_FEATURES, cal.header_weights)


def decision_metrics(probs: np.ndarray, targets: np.ndarray, flagged: np.ndarray) -> DecisionMetrics:
    """Sens/spec of the given decisions with Wilson 95% CIs, ECE of the probabilities, confusion counts."""
    y = np.asarray(targets) > 0.5
    tp, fn = int((flagged & y).sum()), int((~flagged & y).sum())
    tn, fp = int((~flagged & ~y).sum()), int((flagged & ~y).sum())
    return DecisionMetrics(
        sensitivity=tp / (tp + fn) if tp + fn else None,
        sensitivity_ci95=wilson_interval(tp, tp + fn),
        specificity=tn / (tn + fp) if tn + fp else None,
        specificity_ci95=wilson_interval(tn, tn + fp),
        ece=expected_calibration_error(probs, targets),
        confusion=Confusion(tp=tp, fp=fp, tn=tn, fn=fn),
    )


def class_metrics(probs: np.ndarray, targets: np.ndarray, threshold: float) -> ClassMetrics:
    """AUROC, sens/spec at the threshold with Wilson 95% CIs, ECE, confusion counts for one class."""
    y = np.asarray(targets) > 0.5
    decisions = decision_metrics(probs, targets, np.asarray(probs) >= threshold)
    return ClassMetrics(**{f.name: getattr(decisions, f.name) for f in dataclasses.fields(DecisionMetrics)},
                        auroc=auroc(probs, targets), threshold=float(threshold), positives=int(y.sum()),
                        negatives=int((~y).sum()))


def validation_metrics(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                       thresholds: Mapping[str, float], by_manufacturer: Mapping[str, GroupMetrics] | None = None,
                       out_of_fold: OutOfFold | None = None) -> ValidationMetrics:
    per_class = {c: class_metrics(probs[:, k], targets[:, k], thresholds[c]) for k, c in enumerate(classes)}
    aurocs = [m.auroc for m in per_class.values() if m.auroc is not None]
    exact = float(np.mean(np.all((probs >= np.array([thresholds[c] for c in classes])) == (targets > 0.5), axis=1))) \
        if len(probs) else None
    return ValidationMetrics(
        per_class=per_class,
        mean_auroc=float(np.mean(aurocs)) if aurocs else None,
        mean_ece=float(np.mean([m.ece for m in per_class.values()])) if per_class else None,
        exact_match_at_threshold=exact,
        n_valid=int(len(probs)),
        by_manufacturer=dict(by_manufacturer or {}),
        out_of_fold=out_of_fold,
    )


def apply_calibration(logits: np.ndarray, cal: Calibration, classes: Sequence[str],
                      header: np.ndarray | None = None) -> np.ndarray:
    """Probabilities as a spec with this calibration serves them (``mammoflag.inference.fused_logits``)."""
    t = np.array([cal.temperatures[c] for c in classes])
    if not cal.header_weights or header is None:
        return sigmoid(fused_logits(logits, t))
    return sigmoid(fused_logits(logits, t, weight_matrix(cal.header_weights, classes, len(HEADER_FEATURES)), header))


@dataclass(frozen=True)
class FoldScores:
    """Validation images scored out of fold: each by the calibration fitted on the other folds."""

    fold_of: np.ndarray  # (N,) the fold of each image
    probs: np.ndarray  # (N, C)
    thresholds: np.ndarray  # (N, C): the threshold each image was judged at
    temperatures: tuple[dict[str, float], ...]  # per fold


def out_of_fold_scores(logits: np.ndarray, targets: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                       target_sensitivity: float, folds: int = 2, header: np.ndarray | None = None,
                       header_classes: Sequence[str] = ()) -> FoldScores | None:
    """Validation images split into ``folds`` by their group (patient: no patient on both sides), each fold
    calibrated (temperature, header weights, threshold) on the others. None when some fold would be empty."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    fold_of = _fold_of(groups, folds)
    if len(fold_of) == 0 or len(set(fold_of.tolist())) < folds:
        return None
    probs = np.empty_like(logits)
    thresholds_used = np.empty_like(logits)
    temperatures: list[dict[str, float]] = []
    for f in range(folds):
        fit, apply = fold_of != f, fold_of == f
        cal = calibrate(logits[fit], targets[fit], classes, target_sensitivity,
                        header=None if header is None else np.asarray(header)[fit], header_classes=header_classes)
        temperatures.append(cal.temperatures)
        probs[apply] = apply_calibration(logits[apply], cal, classes,
                                         None if header is None else np.asarray(header)[apply])
        thresholds_used[apply] = np.array([cal.thresholds[c] for c in classes])
    return FoldScores(fold_of, probs, thresholds_used, tuple(temperatures))


def out_of_fold_metrics(logits: np.ndarray, targets: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                        target_sensitivity: float, folds: int = 2, header: np.ndarray | None = None,
                        header_classes: Sequence[str] = ()) -> OutOfFold | None:
    """Sensitivity, specificity and ECE as images the calibration never saw would get them.

    Validation images are split into ``folds`` by their group (patient: no patient on both
    sides); each fold is scored with the temperature, header weights and threshold fitted on the
    others, and the out-of-fold decisions are pooled. None when some fold would be empty. Per class it
    also records the reliability diagram of the pooled out-of-fold images before temperature scaling
    (sigmoid of the logit) and after (each fold calibrated by what the other folds chose).
    """
    scores = out_of_fold_scores(logits, targets, groups, classes, target_sensitivity, folds, header, header_classes)
    if scores is None:
        return None
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    probs = scores.probs
    per_class = {c: decision_metrics(probs[:, k], targets[:, k], probs[:, k] >= scores.thresholds[:, k])
                 for k, c in enumerate(classes)}
    reliability = {c: OutOfFoldReliability(before=reliability_curve(sigmoid(logits[:, k]), targets[:, k]),
                                           after=reliability_curve(probs[:, k], targets[:, k]),
                                           temperatures=tuple(float(t[c]) for t in scores.temperatures))
                   for k, c in enumerate(classes)}
    return OutOfFold(folds=folds, split="by patient", per_class=per_class,
                     fold_sizes=tuple(int((scores.fold_of == f).sum()) for f in range(folds)),
                     reliability=reliability)


def metrics_by(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], classes: Sequence[str],
               thresholds: Mapping[str, float]) -> dict[str, GroupMetrics]:
    """``class_metrics`` per value of ``labels`` (a manufacturer per image): where does the model do worse?

    Small groups give wide intervals; the counts and Wilson intervals say how far to trust each row.
    """
    values = np.asarray([str(x) or UNKNOWN_MANUFACTURER for x in labels])
    out: dict[str, GroupMetrics] = {}
    for value in sorted(set(values.tolist())):
        rows = values == value
        out[value] = GroupMetrics(n=int(rows.sum()),
                                  per_class={c: class_metrics(probs[rows, k], targets[rows, k], thresholds[c])
                                             for k, c in enumerate(classes)})
    return out


def mean_auroc(probs: np.ndarray, targets: np.ndarray) -> float | None:
    vals = [a for k in range(targets.shape[1]) if (a := auroc(probs[:, k], targets[:, k])) is not None]
    return float(np.mean(vals)) if vals else None


def save_plots(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], thresholds: dict[str, float],
               out_dir: Path) -> list[Path]:
    """reliability.png and roc.png (one curve per class) under ``out_dir``; matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect")
    edges = np.linspace(0, 1, 11)
    for k, c in enumerate(classes):
        which = np.clip(np.digitize(probs[:, k], edges[1:-1]), 0, 9)
        xs = [probs[which == b, k].mean() for b in range(10) if (which == b).any()]
        ys = [targets[which == b, k].mean() for b in range(10) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=c)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability (validation)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    written.append(out_dir / "reliability.png")
    fig.savefig(written[-1], dpi=80)

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    for k, c in enumerate(classes):
        fpr, tpr = roc_curve(probs[:, k], targets[:, k])
        a = auroc(probs[:, k], targets[:, k])
        ax.plot(fpr, tpr, label=f"{c} (AUROC {a:.3f})" if a is not None else f"{c} (one class only)")
        y = targets[:, k] > 0.5
        if y.any() and (~y).any():
            flagged = probs[:, k] >= thresholds[c]
            ax.plot([(flagged & ~y).sum() / (~y).sum()], [(flagged & y).sum() / y.sum()], marker="x", color="black")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (validation; x = threshold)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    written.append(out_dir / "roc.png")
    fig.savefig(written[-1], dpi=80)
    return written


def roc_curve(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    order = np.argsort(-p, kind="stable")
    tps = np.concatenate([[0], np.cumsum(y[order])])
    fps = np.concatenate([[0], np.cumsum(~y[order])])
    return fps / max(1, (~y).sum()), tps / max(1, y.sum())
