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


def _header_case(seed: int, n: int = 120):
    """Image logits that rank a class moderately; a header feature that says it on 80 % of its positives."""
    from mammoflag.header_evidence import HEADER_FEATURES

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    logits = np.where(y > 0, rng.normal(1.0, 1.5, n), rng.normal(-1.0, 1.5, n))
    header = np.zeros((n, len(HEADER_FEATURES)))
    header[:, HEADER_FEATURES.index("mag_factor_present")] = 1.0
    header[:, HEADER_FEATURES.index("mag_modifier")] = (y > 0) & (rng.random(n) < 0.8)
    header[:, HEADER_FEATURES.index("partial_view")] = rng.random(n) < 0.5  # says nothing
    header[:, HEADER_FEATURES.index("header_speaks")] = header.any(axis=1)
    return logits, y, header


def test_header_weights_follow_what_the_header_says_and_ignore_what_it_does_not():
    from mammoflag.header_evidence import HEADER_FEATURES
    from training.calibrate import fit_header_weights

    logits, y, header = _header_case(0)
    w = fit_header_weights(logits, header, y)
    assert w[HEADER_FEATURES.index("mag_modifier")] > 2.0
    assert abs(w[HEADER_FEATURES.index("partial_view")]) < 0.6
    assert w[HEADER_FEATURES.index("mag_factor_present")] < 0  # a contact-like header pulls down
    assert not np.any(fit_header_weights(logits, np.zeros_like(header), y))  # no header: nothing to weigh
    assert not np.any(fit_header_weights(logits, header, np.ones_like(y)))  # one outcome only


def test_only_a_class_the_header_alone_ranks_gets_header_weights():
    """A header feature a few positives happen to share can lower the log-loss of the images it was fitted on;
    whether the header alone ranks the class over every labelled patient decides."""
    from mammoflag.header_evidence import HEADER_FEATURES
    from training.calibrate import HEADER_MIN_AUROC, classes_told_by_header, header_auroc

    logits, y, told = _header_case(3, 400)
    rng = np.random.default_rng(1003)  # not _header_case's stream: that would make the noise telling
    noise = np.zeros((len(y), len(HEADER_FEATURES)))
    noise[:, HEADER_FEATURES.index("partial_view")] = rng.random(len(y)) < 0.5
    noise[:, HEADER_FEATURES.index("spot_modifier")] = rng.random(len(y)) < 0.2
    noise[:, 0] = noise[:, 1:].any(axis=1)
    groups = [f"p{i // 2}" for i in range(len(y))]
    assert header_auroc(told, y, groups) > 0.85 and header_auroc(noise, y, groups) < 0.6
    assert header_auroc(np.zeros_like(told), y, groups) is None  # no header at all: nothing to say
    assert classes_told_by_header(told, y[:, None], groups, ["mag_view"])["mag_view"] >= HEADER_MIN_AUROC
    cal = calibrate(logits[:, None], y[:, None], ["mag_view"], 0.95, header=noise, header_classes=())
    assert cal.header_weights == {} and cal.thresholds == calibrate(logits[:, None], y[:, None], ["mag_view"],
                                                                    0.95).thresholds


def test_headers_improve_ranking_and_the_threshold_still_catches_header_less_positives():
    """Out of fold the header-fused scores rank better; the threshold keeps the target sensitivity both as
    served and for the same images with their headers stripped (an archive whose headers are empty)."""
    from training.calibrate import apply_calibration, out_of_fold_scores

    from mammoflag.header_evidence import HEADER_FEATURES

    logits, y, header = _header_case(1, 300)
    rng = np.random.default_rng(1001)
    # a magnification factor above a contact view's on all but a few positives (a header that slipped)
    excess = np.where((y > 0) & (rng.random(len(y)) < 0.97), rng.uniform(0.3, 1.0, len(y)), rng.uniform(0, 0.2, len(y)))
    header[:, HEADER_FEATURES.index("mag_factor_excess")] = excess
    classes = ["mag_view"]
    groups = [f"p{i // 2}" for i in range(len(y))]
    cal = calibrate(logits[:, None], y[:, None], classes, 0.95, header=header, header_classes=classes)
    image_only = calibrate(logits[:, None], y[:, None], classes, 0.95)
    assert cal.temperatures == image_only.temperatures and cal.thresholds == image_only.thresholds
    assert cal.header_weights
    served = apply_calibration(logits[:, None], cal, classes, header)[:, 0]
    stripped = apply_calibration(logits[:, None], cal, classes, np.zeros_like(header))[:, 0]
    t = cal.thresholds["mag_view"]
    assert (served[y > 0] >= t).mean() >= 0.95 and (stripped[y > 0] >= t).mean() >= 0.95
    # the header's intercept moved so that the one threshold spares far more negatives whose header speaks
    assert (served[y == 0] < t).mean() > (stripped[y == 0] < t).mean() + 0.1
    fused = out_of_fold_scores(logits[:, None], y[:, None], groups, classes, 0.95, header=header,
                               header_classes=classes)
    plain = out_of_fold_scores(logits[:, None], y[:, None], groups, classes, 0.95)
    assert fused is not None and plain is not None
    assert auroc(fused.probs[:, 0], y) > auroc(plain.probs[:, 0], y) + 0.05
    oof = out_of_fold_metrics(logits[:, None], y[:, None], groups, classes, 0.95, header=header,
                              header_classes=classes)
    assert oof is not None and oof.per_class["mag_view"].specificity > \
        out_of_fold_metrics(logits[:, None], y[:, None], groups, classes, 0.95).per_class["mag_view"].specificity


def test_a_class_the_header_says_nothing_of_keeps_the_image_alone_beside_one_it_does():
    from training.calibrate import apply_calibration, classes_told_by_header

    logits, y, header = _header_case(2, 300)
    rng = np.random.default_rng(2002)
    other_y = (rng.random(len(y)) < 0.3).astype(float)  # a class the header knows nothing of
    other = np.where(other_y > 0, rng.normal(1, 1.5, len(y)), rng.normal(-1, 1.5, len(y)))
    both_logits, both_y = np.stack([logits, other], axis=1), np.stack([y, other_y], axis=1)
    groups = [f"p{i // 2}" for i in range(len(y))]
    told = classes_told_by_header(header, both_y, groups, ["mag_view", "biopsy_tool"])
    assert told["mag_view"] > 0.75 > told["biopsy_tool"]
    cal = calibrate(both_logits, both_y, ["mag_view", "biopsy_tool"], 0.95, header=header,
                    header_classes=("mag_view",))
    assert set(cal.header_weights) == {"mag_view"}
    probs = apply_calibration(both_logits, cal, ["mag_view", "biopsy_tool"], header)
    np.testing.assert_allclose(probs[:, 1], sigmoid(other / cal.temperatures["biopsy_tool"]))
    oof = out_of_fold_metrics(both_logits, both_y, groups, ["mag_view", "biopsy_tool"], 0.95, header=header,
                              header_classes=("mag_view",))
    assert oof is not None and set(oof.per_class) == {"mag_view", "biopsy_tool"}
