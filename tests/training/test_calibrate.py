"""Temperature scaling, thresholds for a target sensitivity, Wilson intervals, AUROC, ECE, plots."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from training.calibrate import (auroc, calibrate, expected_calibration_error, fit_temperature, out_of_fold_metrics,
                                save_plots, sigmoid, threshold_for_sensitivity, validation_metrics, wilson_interval)


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), example: 81 successes of 263 -> 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=5e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_temperature_recovers_the_true_one():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < sigmoid(true_logits)).astype(float)
    overconfident = true_logits * 3.0  # the model is 3x too sure
    assert fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(overconfident, np.ones(4000)) == 1.0  # one class only: nothing to fit


def test_threshold_reaches_the_target_sensitivity():
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.3
    p = np.clip(np.where(y, rng.normal(0.7, 0.2, 500), rng.normal(0.3, 0.2, 500)), 0, 1)
    t = threshold_for_sensitivity(p, y, 0.95)
    sens = (p[y] >= t).mean()
    assert sens >= 0.95
    # the highest such threshold, up to the gap below the last positive it must keep
    kth_positive = np.sort(p[y])[::-1][int(np.ceil(0.95 * y.sum())) - 1]
    assert t <= kth_positive and not ((p > t) & (p < kth_positive)).any()
    assert threshold_for_sensitivity(p, np.zeros(500), 0.95) == 0.5


def test_auroc_matches_pairwise_definition_with_ties():
    p = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.9])
    y = np.array([0, 0, 1, 1, 0, 1])
    pairs = [(a, b) for a in p[y == 1] for b in p[y == 0]]
    expected = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert auroc(p, y) == pytest.approx(expected)
    assert auroc(p, np.ones(6)) is None


def test_ece_is_zero_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(2)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.full(1000, 0.9), np.zeros(1000)) == pytest.approx(0.9)


def test_calibrate_and_metrics_and_plots(tmp_path):
    rng = np.random.default_rng(3)
    y = (rng.random((300, 2)) < 0.4).astype(float)
    logits = (y * 2 - 1) * 4 + rng.normal(0, 3, (300, 2))
    cal = calibrate(logits, y, ("a", "b"), 0.9)
    probs = sigmoid(logits / np.array([cal.temperatures["a"], cal.temperatures["b"]]))
    m = validation_metrics(probs, y, ("a", "b"), cal.thresholds)
    for c in ("a", "b"):
        cm = m.per_class[c]
        assert cm.sensitivity >= 0.9
        lo, hi = cm.sensitivity_ci95
        assert lo <= cm.sensitivity <= hi
        assert sum(vars(cm.confusion).values()) == 300
        assert 0.8 < cm.auroc <= 1.0
    paths = save_plots(probs, y, ("a", "b"), cal.thresholds, tmp_path / "plots")
    assert [p.name for p in paths] == ["reliability.png", "roc.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def _fold(group: str) -> int:  # the documented split: sha256 of the patient, two folds
    return int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) % 2


def test_out_of_fold_scores_each_half_with_the_other_halfs_calibration():
    rng = np.random.default_rng(3)
    groups = [f"patient-{i // 2}" for i in range(240)]  # two images per patient
    y = rng.random((240, 2)) < 0.3
    logits = np.where(y, 1.5, -1.5) * rng.uniform(0.2, 2.0, (240, 2)) + rng.normal(0, 1.2, (240, 2))
    classes = ["biopsy_tool", "mag_view"]
    oof = out_of_fold_metrics(logits, y.astype(float), groups, classes, 0.95)

    fold = np.array([_fold(g) for g in groups])
    assert oof.fold_sizes == (int((fold == 0).sum()), int((fold == 1).sum()))
    assert all(size % 2 == 0 for size in oof.fold_sizes)  # a patient's two images stay together
    for k, c in enumerate(classes):
        flagged = np.zeros(240, bool)
        for f in (0, 1):
            other = calibrate(logits[fold != f], y[fold != f].astype(float), classes, 0.95)
            p = 1 / (1 + np.exp(-logits[fold == f, k] / other.temperatures[c]))
            flagged[fold == f] = p >= other.thresholds[c]
        tp, fn = int((flagged & y[:, k]).sum()), int((~flagged & y[:, k]).sum())
        tn, fp = int((~flagged & ~y[:, k]).sum()), int((flagged & ~y[:, k]).sum())
        assert vars(oof.per_class[c].confusion) == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        assert oof.per_class[c].sensitivity == pytest.approx(tp / (tp + fn))
        # the reliability diagram, by hand: ten equal-width bins of the pooled out-of-fold probabilities
        temps = np.empty(240)
        for f in (0, 1):
            temps[fold == f] = calibrate(logits[fold != f], y[fold != f].astype(float), classes, 0.95).temperatures[c]
        rel = oof.reliability[c]
        assert rel.temperatures == pytest.approx(tuple(
            calibrate(logits[fold != f], y[fold != f].astype(float), classes, 0.95).temperatures[c] for f in (0, 1)))
        for curve, p in ((rel.before, 1 / (1 + np.exp(-logits[:, k]))), (rel.after, 1 / (1 + np.exp(-logits[:, k] / temps)))):
            which = np.minimum((p * 10).astype(int), 9)
            assert [b.n for b in curve.bins] == [int((which == b).sum()) for b in range(10)]
            gaps = [abs(y[which == b, k].mean() - p[which == b].mean()) * (which == b).sum() / 240
                    for b in range(10) if (which == b).any()]
            assert curve.ece == pytest.approx(sum(gaps))
            full = next(b for b in curve.bins if b.n)
            assert full.observed == pytest.approx(y[which == round(full.low * 10), k].mean())
        assert rel.after.ece == pytest.approx(oof.per_class[c].ece)
        assert rel.before.ece != pytest.approx(rel.after.ece)  # the scaling changed the calibration
    # the card keeps it through JSON; a card written before it loads with none
    from mammoflag.card import OutOfFold, from_jsonable, to_jsonable

    again = from_jsonable(OutOfFold, json.loads(json.dumps(to_jsonable(oof))))
    assert again == oof
    old = to_jsonable(oof)
    del old["reliability"]
    assert from_jsonable(OutOfFold, old).reliability == {}
    # in-sample, the threshold reaches the target by construction; out of fold it need not
    in_sample = calibrate(logits, y.astype(float), classes, 0.95)
    p_in = 1 / (1 + np.exp(-logits[:, 0] / in_sample.temperatures["biopsy_tool"]))
    assert ((p_in >= in_sample.thresholds["biopsy_tool"]) & y[:, 0]).sum() / y[:, 0].sum() >= 0.95


def test_out_of_fold_needs_patients_on_both_sides():
    logits, y = np.zeros((4, 1)), np.array([[1.0], [0.0], [1.0], [0.0]])
    assert out_of_fold_metrics(logits, y, ["one-patient"] * 4, ["biopsy_tool"], 0.95) is None
    assert out_of_fold_metrics(np.zeros((0, 1)), np.zeros((0, 1)), [], ["biopsy_tool"], 0.95) is None
