"""Promotion: does a new version replace the current one?

Two rules, both on evidence recorded in the cards:

1. **Trust never regresses.** A version on which a class is not ``learned`` (trust gate) never
   replaces a current version on which that class is: the research lead's flags for a class
   must not silently go from trustworthy to not.
2. **Not worse.** Mean validation AUROC >= the current's - epsilon, both scored on THIS run's
   validation images, the current version as it serves (its INT8 model when it kept one, its
   header weights on these images' header evidence).

A current version built for other classes or preprocessing cannot serve this label config, so
any new version replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mammoflag.card import TrustGate
from mammoflag.preprocess import load_display_image
from mammoflag.registry import ModelVersion
from mammoflag.spec import ModelSpec
from training.calibrate import binary_log_loss, mean_auroc


@dataclass(frozen=True)
class Promotion:
    become_current: bool
    reason: str
    new_mean_auroc: float | None
    current_mean_auroc: float | None
    compared_with: str | None


def trust_regressions(new: TrustGate, current: ModelVersion) -> list[str]:
    """Classes the current version has learned and the new one has not."""
    if current.card.trust is None:
        return []
    return [c for c in current.card.trust.learned_classes() if c in new.per_class and not new.learned(c)]


def decide_promotion(new_probs: np.ndarray, valid_x: np.ndarray, valid_y: np.ndarray, valid_images: Sequence[Path],
                     spec: ModelSpec, new_trust: TrustGate, current: ModelVersion | None,
                     epsilon: float, valid_header: np.ndarray | None = None) -> Promotion:
    new = mean_auroc(new_probs, valid_y)
    if current is None:
        return Promotion(True, "first version: nothing to compare with", new, None, None)
    from mammoflag.inference import OnnxClassifier
    from mammoflag.spec import SpecMismatch

    cur_spec = current.spec
    if tuple(cur_spec.classes) != tuple(spec.classes) or cur_spec.preprocessing_version != spec.preprocessing_version:
        return Promotion(True, f"current {current.name} has other classes or preprocessing", new, None, current.name)
    try:
        classifier = OnnxClassifier(current, prefer_int8=True)
        if cur_spec.input_size == spec.input_size:
            cur_probs = classifier.probabilities(valid_x, valid_header)
        else:
            cur_probs = classifier.probabilities_for_displays([load_display_image(p) for p in valid_images],
                                                              valid_header)
    except (OSError, SpecMismatch, RuntimeError, ValueError) as exc:
        return Promotion(True, f"current {current.name} cannot be scored ({type(exc).__name__}: {exc})", new, None,
                         current.name)
    cur = mean_auroc(cur_probs, valid_y)
    lost = trust_regressions(new_trust, current)
    if lost:
        said = "; ".join(f"{new_trust.explain(c)}, but learned on {current.name}" for c in lost)
        return Promotion(False, f"candidate only: trust would regress: {said}", new, cur, current.name)
    if new is None or cur is None:
        # No class has both positives and negatives in validation: AUROC says nothing; compare log-loss instead.
        new_ll, cur_ll = binary_log_loss(new_probs, valid_y), binary_log_loss(cur_probs, valid_y)
        ok = new_ll <= cur_ll + epsilon
        return Promotion(ok, f"validation has no class with both outcomes; log-loss new {new_ll:.4f} vs current "
                             f"{current.name} {cur_ll:.4f}", new, cur, current.name)
    if new >= cur - epsilon:
        return Promotion(True, f"mean validation AUROC {new:.4f} >= current {current.name} {cur:.4f} - {epsilon}",
                         new, cur, current.name)
    return Promotion(False, f"candidate only: mean validation AUROC {new:.4f} < current {current.name} "
                            f"{cur:.4f} - {epsilon} on the same {len(valid_y)} validation images",
                     new, cur, current.name)
