"""Statistics that training and the reports both quote, defined once.

- :func:`wilson_interval`: the Wilson score interval of a proportion (sensitivity,
  specificity); :func:`positives_for_half_width`: how many cases an interval that narrow needs.
- :func:`reliability_curve` / :func:`expected_calibration_error`: equal-width probability bins,
  the observed frequency in each, and their weighted mean gap (ECE).

Plain arrays in, frozen dataclasses or floats out; nothing here knows about Label Studio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054
DEFAULT_BINS = 10


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when n is 0."""
    if n == 0:
        return (0.0, 1.0)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def wilson_half_width(successes: int, n: int, z: float = Z_95) -> float:
    """Half the width of the Wilson interval (0.5 when n is 0)."""
    lo, hi = wilson_interval(successes, n, z)
    return (hi - lo) / 2


def positives_for_half_width(proportion: float | None, half_width: float = 0.10, z: float = Z_95,
                             limit: int = 1_000_000) -> int:
    """The fewest cases whose Wilson interval at ``proportion`` is at most +-``half_width`` wide.

    ``proportion`` is the observed one (a sensitivity of 0.9 needs fewer positives than 0.5 for
    the same width); None means unknown, and the worst case 0.5 is used. The count is rounded
    to the number of successes a proportion that size would have at each n.
    """
    p = 0.5 if proportion is None else min(1.0, max(0.0, float(proportion)))
    # the Wald width bounds it from above; search upward from a lower start
    n = max(1, int((z / half_width) ** 2 * p * (1 - p) * 0.5))
    while n <= limit:
        if wilson_half_width(round(p * n), n, z) <= half_width + 1e-12:
            return n
        n += 1
    return limit


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    n: int
    mean_predicted: float | None  # None for an empty bin
    observed: float | None


@dataclass(frozen=True)
class ReliabilityCurve:
    """Equal-width bins of predicted probability against the observed frequency; ECE their weighted gap."""

    bins: tuple[ReliabilityBin, ...]
    ece: float
    n: int


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)


def reliability_curve(probs: np.ndarray, targets: np.ndarray, bins: int = DEFAULT_BINS) -> ReliabilityCurve:
    """The reliability diagram's points and the expected calibration error (binary, one class)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    which = _bin_index(p, bins)
    out, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        n = int(in_bin.sum())
        if n:
            mean_p, obs = float(p[in_bin].mean()), float(y[in_bin].mean())
            ece += n / len(p) * abs(obs - mean_p)
            out.append(ReliabilityBin(b / bins, (b + 1) / bins, n, mean_p, obs))
        else:
            out.append(ReliabilityBin(b / bins, (b + 1) / bins, 0, None, None))
    return ReliabilityCurve(tuple(out), float(ece), int(len(p)))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Weighted mean |observed frequency - mean predicted probability| over equal-width bins."""
    if len(np.asarray(probs)) == 0:
        return 0.0
    return reliability_curve(probs, targets, bins).ece
