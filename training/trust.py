"""The trust gate: has the model learned each class well enough for its flags to be used?

A version's flags are delivered to a research lead who cannot check them image by image, so
every class gets a verdict from its validation images (patients training never saw):

- ``learned``: the lower 95 % bound of validation AUROC (bootstrap over *patients*: images of
  one patient move together, as they do in the split; for a class with header weights, which are
  fitted on these very images, of its out-of-fold scores) is at least ``min_auroc_lower``, **and**
  the out-of-fold sensitivity at the threshold (each half of the validation patients judged
  with the calibration fitted on the other half) reaches the target's lower bound: the lower
  Wilson 95 % bound of a proportion equal to the target sensitivity at that many positives.
- ``insufficient evidence``: fewer than ``min_positives`` positive or ``min_negatives`` negative
  validation images, or no out-of-fold estimate; the verdict says how many more it needs.
- ``not learned``: otherwise. The reason gives the figures, and, when the point AUROC is above
  the bar but its interval is not, roughly how many more validation positives would settle it.

The verdict decides what is flagged by default (only learned classes), what ``mammoflag flag``
refuses without ``--allow-unreliable``, and promotion (a version that has not learned a class
never replaces a current version that has).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from mammoflag.card import ClassTrust, OutOfFold, TrustGate, TrustRule, Verdict
from mammoflag.stats import Z_95
from training.calibrate import auroc


def bootstrap_auroc_interval(probs: np.ndarray, targets: np.ndarray, groups: Sequence[str], resamples: int,
                             confidence: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of AUROC over resamples of whole groups (patients) with replacement.

    Vectorised: with each image weighted by how often its group was drawn, a resample's AUROC is
    ``w_pos @ W @ w_neg / (sum w_pos * sum w_neg)`` where ``W[i, j]`` is 1 when positive i outranks
    negative j (0.5 on ties), the Mann-Whitney statistic. Resamples without a positive or a
    negative are dropped; None when there are no pairs at all.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    if y.sum() == 0 or (~y).sum() == 0:
        return None
    _, group_index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    pos, neg = p[y], p[~y]
    wins = (pos[:, None] > neg[None, :]).astype(np.float64) + 0.5 * (pos[:, None] == neg[None, :])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(resamples, n_groups))
    counts = np.zeros((resamples, n_groups))
    np.add.at(counts, (np.repeat(np.arange(resamples), n_groups), draws.ravel()), 1.0)
    w_pos, w_neg = counts[:, group_index[y]], counts[:, group_index[~y]]
    denom = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    ok = denom > 0
    if not ok.any():
        return None
    stats = np.einsum("rp,pn,rn->r", w_pos[ok], wins, w_neg[ok]) / denom[ok]
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def sensitivity_floor(target: float, positives: int, z: float = Z_95) -> float:
    """The lowest observed sensitivity still consistent with the target at this many positives (Wilson)."""
    if positives <= 0:
        return 1.0
    denom = 1 + z * z / positives
    centre = (target + z * z / (2 * positives)) / denom
    half = z * math.sqrt(target * (1 - target) / positives + z * z / (4 * positives * positives)) / denom
    return max(0.0, centre - half)


def assess_class(cls: str, probs: np.ndarray, targets: np.ndarray, groups: Sequence[str],
                 oof: OutOfFold | None, rule: TrustRule, seed: int = 0, auroc_out_of_fold: bool = False) -> ClassTrust:
    """``auroc_out_of_fold``: ``probs`` are out-of-fold scores (header weights were fitted on these images), and the
    figures say so."""
    y = np.asarray(targets) > 0.5
    positives, negatives = int(y.sum()), int((~y).sum())
    more_pos, more_neg = max(0, rule.min_positives - positives), max(0, rule.min_negatives - negatives)
    point = auroc(probs, targets)
    interval = bootstrap_auroc_interval(probs, targets, groups, rule.bootstrap_resamples, rule.confidence, seed)
    oof_metrics = oof.per_class.get(cls) if oof else None
    oof_sens = oof_metrics.sensitivity if oof_metrics else None
    oof_spec = oof_metrics.specificity if oof_metrics else None
    oof_sens_ci = oof_metrics.sensitivity_ci95 if oof_metrics else None
    floor = sensitivity_floor(rule.target_sensitivity, positives)
    kind = "out-of-fold validation AUROC (with header evidence)" if auroc_out_of_fold else "validation AUROC"
    figures = (f"{kind} {_f(point)} (95% CI {_ci(interval)}) on {positives} positive and {negatives} "
               f"negative images; out-of-fold sensitivity {_f(oof_sens)} (needs >= {floor:.2f}), "
               f"specificity {_f(oof_spec)}")
    base = ClassTrust(Verdict.NOT_LEARNED, figures, positives, negatives, auroc=point, auroc_ci95=interval,
                      oof_sensitivity=oof_sens, oof_sensitivity_ci95=oof_sens_ci, oof_specificity=oof_spec,
                      sensitivity_floor=floor)
    if more_pos or more_neg or interval is None:
        needs = " and ".join(part for part in (f"{more_pos} more positive" if more_pos else "",
                                               f"{more_neg} more negative" if more_neg else "") if part)
        return replace(base, verdict=Verdict.INSUFFICIENT_EVIDENCE,
                       reason=f"too few validation images to say: needs {needs or 'both outcomes'} validation images "
                              f"(at least {rule.min_positives} positive and {rule.min_negatives} negative; validation "
                              f"is about a fifth of the labels); {figures}",
                       more_positives_needed=more_pos, more_negatives_needed=more_neg)
    if oof_sens is None:
        return replace(base, verdict=Verdict.INSUFFICIENT_EVIDENCE,
                       reason=f"no out-of-fold estimate (validation patients too few to split in two); {figures}")
    auroc_ok = interval[0] >= rule.min_auroc_lower
    sens_ok = oof_sens + 1e-12 >= floor
    if auroc_ok and sens_ok:
        return replace(base, verdict=Verdict.LEARNED)
    failed = []
    if not auroc_ok:
        failed.append(f"AUROC lower bound {interval[0]:.2f} < {rule.min_auroc_lower}")
    if not sens_ok:
        failed.append(f"out-of-fold sensitivity {oof_sens:.2f} < {floor:.2f}")
    more = _positives_to_settle(point, interval, positives, rule)
    hint = f"; if the AUROC holds, about {more} more validation positives would settle it" if more else ""
    return replace(base, reason=f"{'; '.join(failed)}{hint}; {figures}", more_positives_needed=more)


def assess(probs: np.ndarray, targets: np.ndarray, groups: Sequence[str], classes: Sequence[str],
           oof: OutOfFold | None, rule: TrustRule, seed: int = 0,
           out_of_fold_classes: Sequence[str] = ()) -> TrustGate:
    """The verdict of every class from validation probabilities (as served; out of fold for the
    ``out_of_fold_classes``, whose header weights were fitted on these images), targets and patient groups."""
    per_class: Mapping[str, ClassTrust] = {
        c: assess_class(c, probs[:, k], targets[:, k], groups, oof, rule, seed + k, c in out_of_fold_classes)
        for k, c in enumerate(classes)}
    return TrustGate(rule=rule, per_class=per_class)


def _positives_to_settle(point: float | None, interval: tuple[float, float], positives: int,
                         rule: TrustRule) -> int:
    """An interval's half-width shrinks like 1/sqrt(n): how many more positives bring its low end to the bar."""
    if point is None or point <= rule.min_auroc_lower or interval[0] >= rule.min_auroc_lower:
        return 0
    half, wanted = point - interval[0], point - rule.min_auroc_lower
    return max(1, math.ceil(positives * (half / wanted) ** 2) - positives)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ci(interval: tuple[float, float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"
