"""The statistics the report and training quote: kappa against hand-worked tables, Wilson intervals
against published values, ECE and reliability bins by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mammoflag.agreement import class_agreement, cohen_estimate, cohen_kappa, fleiss_estimate, fleiss_kappa
from mammoflag.stats import (expected_calibration_error, positives_for_half_width, reliability_curve,
                             wilson_half_width, wilson_interval)

Y, N, M = frozenset({"biopsy_tool"}), frozenset({"neither"}), frozenset({"mag_view"})


def table(both_yes: int, a_only: int, b_only: int, both_no: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both_yes + [True] * a_only + [False] * b_only + [False] * both_no
    b = [True] * both_yes + [False] * a_only + [True] * b_only + [False] * both_no
    return a, b


def test_cohen_kappa_against_a_hand_computed_table():
    # 50 tasks: 20 both yes, 5 only A, 10 only B, 15 both no.
    # p_o = 35/50 = 0.7; p_A = 25/50 = 0.5, p_B = 30/50 = 0.6; p_e = 0.5*0.6 + 0.5*0.4 = 0.5
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a, b = table(20, 5, 10, 15)
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    est = cohen_estimate(a, b, resamples=2000, seed=1)
    assert est.kappa == pytest.approx(0.4) and est.tasks == 50 and est.observed == pytest.approx(0.7)
    lo, hi = est.ci95
    assert lo < 0.4 < hi and 0.1 < lo and hi < 0.7  # about +-0.25 at 50 tasks
    # more tasks of the same table: a narrower interval around the same kappa
    big = cohen_estimate(*table(200, 50, 100, 150), resamples=2000, seed=1)
    assert big.kappa == pytest.approx(0.4) and (big.ci95[1] - big.ci95[0]) < (hi - lo) / 2
    assert cohen_kappa([True, True], [True, True]) is None  # chance explains everything
    assert cohen_kappa(*table(10, 0, 0, 10)) == pytest.approx(1.0)
    assert cohen_kappa(*table(0, 10, 10, 0)) == pytest.approx(-1.0)


def test_fleiss_kappa_against_a_hand_computed_table():
    # 4 tasks, 3 readers each; yes answers 3, 0, 2, 1. Agreeing pairs per task: 3/3, 3/3, 1/3, 1/3
    # -> observed 2/3; pooled yes-rate 6/12 -> chance 0.5; kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert fleiss_kappa([3, 0, 2, 1], [3, 3, 3, 3]) == pytest.approx(1 / 3)
    # two readers per task: Fleiss and Cohen differ only in chance (pooled vs per-reader rates)
    est = fleiss_estimate([2, 0, 1, 0], [2, 2, 2, 2], resamples=0)
    p = 3 / 8
    assert est.kappa == pytest.approx((0.75 - (p * p + (1 - p) ** 2)) / (1 - (p * p + (1 - p) ** 2)))
    assert est.ci95 is None and est.tasks == 4
    assert fleiss_kappa([1], [1]) is None  # a single read says nothing about agreement


def test_class_agreement_pairs_fleiss_and_reader_vs_model():
    # readers 1 and 2 read every task, reader 3 the last two; the model's decisions per task
    reads = [{"1": Y, "2": Y}, {"1": N, "2": N}, {"1": Y, "2": N}, {"1": N, "2": N, "3": N},
             {"1": Y | M, "2": Y, "3": Y}, {"1": N}]
    model = [Y, N, Y, Y, Y, None]
    table_ = class_agreement(reads, ["biopsy_tool", "mag_view"], model, resamples=200)
    biopsy = table_["biopsy_tool"]
    assert biopsy.double_read_tasks == 5
    pairs = {(p.reader_a, p.reader_b): p.estimate for p in biopsy.pairs}
    assert set(pairs) == {("1", "2"), ("1", "3"), ("2", "3")}
    # 1 vs 2 on 5 tasks: answers 1 = Y N Y N Y, 2 = Y N N N Y -> p_o 4/5, p_1 3/5, p_2 2/5
    pe = 0.6 * 0.4 + 0.4 * 0.6
    assert pairs[("1", "2")].kappa == pytest.approx((0.8 - pe) / (1 - pe)) and pairs[("1", "2")].tasks == 5
    assert pairs[("1", "3")].tasks == 2 and pairs[("1", "3")].kappa == pytest.approx(1.0)
    # reader 1 vs the model on the 5 scored tasks: Y N Y N Y vs Y N Y Y Y
    r1 = biopsy.reader_vs_model["1"]
    pe = 0.6 * 0.8 + 0.4 * 0.2
    assert r1.tasks == 5 and r1.kappa == pytest.approx((0.8 - pe) / (1 - pe))
    assert biopsy.fleiss.kappa == pytest.approx(fleiss_kappa([2, 0, 1, 0, 3], [2, 2, 2, 3, 3]))
    assert table_["mag_view"].fleiss.kappa == pytest.approx(fleiss_kappa([0, 0, 0, 0, 1], [2, 2, 2, 3, 3]))


def test_wilson_interval_against_known_values():
    # Wilson (1927) / Newcombe (1998) table: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775; 10/10 -> 0.7225-1
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-4)  # Newcombe's example
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_positives_needed_for_an_interval_narrower_than_ten_points():
    for p in (0.5, 0.8, 0.95):
        n = positives_for_half_width(p, 0.10)
        assert wilson_half_width(round(p * n), n) <= 0.10 < wilson_half_width(round(p * (n - 1)), n - 1)
    assert positives_for_half_width(None) == positives_for_half_width(0.5) == 93  # the worst case
    assert positives_for_half_width(0.95) < positives_for_half_width(0.8) < 93


def test_reliability_bins_and_ece_by_hand():
    probs = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 0.95])
    targets = np.array([0, 0, 1, 1, 1, 0])
    curve = reliability_curve(probs, targets, bins=10)
    full = [b for b in curve.bins if b.n]
    assert [(b.low, b.n) for b in full] == [(0.0, 1), (0.1, 2), (0.8, 1), (0.9, 2)]
    assert full[1].observed == 0.5 and full[1].mean_predicted == pytest.approx(0.15)
    # |0-0.05|*1 + |0.5-0.15|*2 + |1-0.85|*1 + |0.5-0.95|*2, over 6
    assert curve.ece == pytest.approx((0.05 + 0.7 + 0.15 + 0.9) / 6)
    assert expected_calibration_error(probs, targets) == pytest.approx(curve.ece)
    assert expected_calibration_error(np.array([]), np.array([])) == 0.0
