"""The trust gate: bootstrap AUROC interval over patients, the sensitivity floor, verdicts, promotion."""

from __future__ import annotations

import numpy as np
import pytest

from mammoflag.card import ModelCard, OutOfFold, TrustRule, Verdict, stand_in_card
from training.calibrate import auroc, decision_metrics, wilson_interval
from training.trust import assess, assess_class, bootstrap_auroc_interval, sensitivity_floor

RULE = TrustRule(bootstrap_resamples=400)


def _oof(cls: str, probs: np.ndarray, y: np.ndarray, threshold: float) -> OutOfFold:
    return OutOfFold(2, "by patient", {cls: decision_metrics(probs, y, probs >= threshold)}, (len(y) // 2,) * 2)


def test_vectorised_bootstrap_equals_resampling_patients_by_hand():
    rng = np.random.default_rng(3)
    groups = [f"p{i // 2}" for i in range(40)]  # two images per patient
    y = np.array([1 if i % 5 == 0 or i % 7 == 0 else 0 for i in range(40)], float)
    probs = np.clip(0.3 * y + rng.normal(0.4, 0.2, 40), 0, 1)
    lo, hi = bootstrap_auroc_interval(probs, y, groups, resamples=300, seed=11)
    # the same draws, resampled the slow way: whole patients, images concatenated
    names, index = np.unique(np.array(groups), return_inverse=True)
    draws = np.random.default_rng(11).integers(0, len(names), size=(300, len(names)))
    stats = []
    for row in draws:
        rows = np.concatenate([np.flatnonzero(index == g) for g in row])
        a = auroc(probs[rows], y[rows])
        if a is not None:
            stats.append(a)
    assert lo == pytest.approx(np.quantile(stats, 0.025)) and hi == pytest.approx(np.quantile(stats, 0.975))
    assert lo <= auroc(probs, y) <= hi


def test_bootstrap_interval_of_a_perfect_and_of_a_one_class_set():
    y = np.array([0, 1] * 10, float)
    assert bootstrap_auroc_interval(y.copy(), y, [str(i) for i in range(20)], 200) == (1.0, 1.0)
    assert bootstrap_auroc_interval(np.zeros(5), np.zeros(5), list("abcde"), 200) is None


def test_sensitivity_floor_is_the_wilson_lower_bound_of_the_target():
    assert sensitivity_floor(0.95, 20) == pytest.approx(wilson_interval(19, 20)[0])
    assert sensitivity_floor(0.95, 100) == pytest.approx(wilson_interval(95, 100)[0])
    assert sensitivity_floor(0.95, 12) < sensitivity_floor(0.95, 40) < 0.95


def test_shuffled_labels_are_not_learned_and_a_real_signal_is():
    rng = np.random.default_rng(0)
    n = 120
    groups = [f"p{i}" for i in range(n)]
    y = (rng.random(n) < 0.3).astype(float)
    signal = np.clip(0.6 * y + rng.normal(0.2, 0.12, n), 0, 1)
    learned = assess_class("c", signal, y, groups, _oof("c", signal, y, 0.35), RULE)
    assert learned.verdict is Verdict.LEARNED, learned.reason
    assert learned.auroc_ci95[0] >= 0.75 and learned.oof_sensitivity >= learned.sensitivity_floor

    shuffled = rng.permutation(y)  # the same scores against labels that mean nothing
    gate = assess(signal[:, None], shuffled[:, None], groups, ["c"], _oof("c", signal, shuffled, 0.35), RULE)
    verdict = gate.per_class["c"]
    assert verdict.verdict is Verdict.NOT_LEARNED and "AUROC lower bound" in verdict.reason
    assert not gate.learned("c") and gate.learned_classes() == ()


def test_too_few_positives_is_insufficient_evidence_and_says_how_many_more():
    y = np.array([1, 1, 1] + [0] * 40, float)
    probs = y * 0.9 + 0.05
    trust = assess_class("c", probs, y, [str(i) for i in range(43)], _oof("c", probs, y, 0.5), RULE)
    assert trust.verdict is Verdict.INSUFFICIENT_EVIDENCE
    assert trust.more_positives_needed == RULE.min_positives - 3 and "7 more positive" in trust.reason


def test_no_out_of_fold_estimate_is_insufficient_evidence():
    rng = np.random.default_rng(1)
    y = np.array([1, 0] * 20, float)
    probs = np.clip(y * 0.5 + rng.normal(0.25, 0.1, 40), 0, 1)
    trust = assess_class("c", probs, y, [str(i) for i in range(40)], None, RULE)
    assert trust.verdict is Verdict.INSUFFICIENT_EVIDENCE and "out-of-fold" in trust.reason


def test_the_gate_survives_the_card_json_round_trip():
    rng = np.random.default_rng(2)
    y = (rng.random(80) < 0.4).astype(float)
    probs = np.clip(0.5 * y + rng.normal(0.2, 0.1, 80), 0, 1)
    gate = assess(probs[:, None], y[:, None], [str(i) for i in range(80)], ["biopsy_tool"],
                  _oof("biopsy_tool", probs, y, 0.4), RULE)
    from dataclasses import replace

    from label_config import load_label_config
    from mammoflag.spec import ModelSpec

    card = replace(stand_in_card(ModelSpec.from_label_config(load_label_config()), "round trip"), trust=gate)
    again = ModelCard.from_json(card.to_json())
    assert again == card and again.verdict("biopsy_tool") is gate.verdict("biopsy_tool")
    # a card written before the trust gate has no verdicts: nothing is shown to be learned
    old = card.to_json()
    old.pop("trust"), old.pop("schema")
    assert ModelCard.from_json(old).verdict("biopsy_tool") is Verdict.INSUFFICIENT_EVIDENCE
