"""mammoflag.novelty: the reference, an image's novelty, and the cohort shift test's error rates."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mammoflag.novelty import (MIN_VALIDATION, SHIFT_ALPHA, NoveltyReference, RankSum, fit_reference,
                               betabinom_sf, nearest_distances, novelty_path, shift_test, study_mean)


def _cloud(rng, n, dim=24, shift=0.0, spread=1.0):
    """Embeddings on a low-dimensional manifold inside ``dim`` features, as a network's pooled features lie."""
    basis = np.random.default_rng(7).normal(size=(4, dim))
    return (rng.normal(size=(n, 4)) * spread + shift) @ basis + 0.05 * rng.normal(size=(n, dim))


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(40, 5))
    brute = np.sqrt(((a[:, None, :] - b[None]) ** 2).sum(-1)).min(1)
    assert np.allclose(nearest_distances(a, b, chunk=64), brute, atol=1e-9)


def test_reference_marks_the_validation_quantile_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    ref = fit_reference("model.int8.onnx", _cloud(rng, 250), _cloud(rng, 79))
    assert ref.k == 4 and ref.n_validation == 79  # ceil(0.05 * 80)
    path = novelty_path(tmp_path, "model.int8.onnx")
    assert path.name == "model.int8.novelty.npz"
    ref.save(path)
    back = NoveltyReference.load(path)
    assert (back.model_file, back.k, back.n_validation) == ("model.int8.onnx", 4, 79)
    x = _cloud(rng, 30)
    assert np.allclose(back.novelty(x), ref.novelty(x), rtol=1e-5)
    # training images are at distance 0 from themselves
    assert np.allclose(ref.novelty(ref.train * ref.scale + ref.mean), 0.0, atol=1e-6)


def test_a_dead_feature_does_not_divide_by_zero():
    rng = np.random.default_rng(2)
    train, valid = _cloud(rng, 100), _cloud(rng, 30)
    train[:, 3] = valid[:, 3] = 0.0  # a channel no training image lights up
    ref = fit_reference("model.onnx", train, valid)
    lit = valid.copy()
    lit[:, 3] = 50.0
    assert np.isfinite(ref.novelty(lit)).all()
    assert np.median(ref.novelty(lit)) > np.median(ref.novelty(valid))


def test_too_few_validation_images_give_no_reference():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="validation"):
        fit_reference("model.onnx", _cloud(rng, 100), _cloud(rng, MIN_VALIDATION - 1))


def _patients(rng, patients, per=3, dim=24, shift=0.0, spread=1.0):
    """Images of ``patients`` patients, ``per`` each, alike within a patient: (embeddings, patient of each)."""
    centres = _cloud(rng, patients, dim, shift, spread)
    images = np.repeat(centres, per, axis=0) + 0.3 * _cloud(rng, patients * per, dim)
    return images, np.repeat(np.arange(patients), per)


def _cohort_test(ref, embeddings, studies):
    novelty = ref.novelty(embeddings)
    means = Counter(study_mean(novelty[studies == s].tolist()) for s in np.unique(studies))
    return shift_test(len(novelty), int((novelty > 1).sum()), ref, means)


@pytest.mark.parametrize("cohort_studies", [20, 700])
def test_same_source_cohorts_rarely_alarm_and_shifted_ones_do(cohort_studies):
    """Over many draws, images alike within a patient: a cohort from the labels' own source alarms at about
    the tests' level or less; one moved as a whole (another site's processing) alarms nearly always."""
    rng = np.random.default_rng(4)
    alarms = Counter()
    draws = 200
    for _ in range(draws):
        train, _ = _patients(rng, 90)
        valid, groups = _patients(rng, 25)
        ref = fit_reference("model.onnx", train, valid, groups)
        assert len(ref.patient_means) == 25
        for kind, shift in (("same", 0.0), ("moved", 2.0)):
            x, studies = _patients(rng, cohort_studies, shift=shift)
            alarms[kind] += _cohort_test(ref, x, studies).shifted
    assert alarms["same"] <= max(2, 5 * SHIFT_ALPHA * draws), alarms
    assert alarms["moved"] >= 0.95 * draws, alarms


def test_the_rank_test_sees_a_cohort_moved_as_a_whole_that_the_tail_does_not():
    """Every study a little farther than most validation patients, no image beyond the reference distance."""
    rng = np.random.default_rng(7)
    train, _ = _patients(rng, 90)
    valid, groups = _patients(rng, 25)
    ref = fit_reference("model.onnx", train, valid, groups)
    above_most = float(np.quantile(ref.patient_means, 0.9))
    t = shift_test(300, 0, ref, {round(above_most, 3): 100})
    assert t.p_value == 1.0 and t.rank_p is not None and t.rank_p < 1e-6 and t.shifted
    typical = shift_test(300, 0, ref, {round(float(np.median(ref.patient_means)), 3): 100})
    assert typical.rank_p is not None and typical.rank_p > 0.1 and not typical.shifted


def test_rank_sum_matches_mann_whitney():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(5)
    reference, cohort = np.sort(rng.normal(size=30)), rng.normal(0.4, 1.0, size=200).round(2)
    ranks = RankSum(reference)
    for mean, count in Counter(cohort.tolist()).items():
        ranks.add(mean, count)
    exact = mannwhitneyu(cohort, reference, alternative="greater", method="asymptotic", use_continuity=True)
    assert ranks.u == pytest.approx(exact.statistic)
    assert ranks.p_value() == pytest.approx(exact.pvalue, rel=0.02)
    assert RankSum(reference[:4]).p_value() is None  # too few patients for the approximation


def test_shift_test_text_names_the_share_and_the_expectation():
    rng = np.random.default_rng(6)
    train, _ = _patients(rng, 90)
    valid, groups = _patients(rng, 26)
    ref = fit_reference("model.onnx", train, valid, groups)
    assert (ref.k, ref.n_validation) == (4, 78)
    t = shift_test(1000, 400, ref)
    assert t.shifted and t.p_value < 1e-6 and t.rank_p is None
    assert "400 of 1000 images (40.0 %)" in t.explain() and "5 % expected" in t.explain()
    assert "does not look like the images the trust gate judged" in t.explain()
    calm = shift_test(1000, 50, ref, {0.5: 300})
    assert not calm.shifted and calm.studies == 300 and calm.rank_p is not None and "no sign" in calm.explain()
    assert "300 studies' mean novelty against the 26 validation patients'" in calm.explain()
    assert shift_test(0, 0, ref).p_value == 1.0


@pytest.mark.parametrize("at_least,m,a,b", [(1, 10, 2, 5), (31, 274, 4, 70), (101, 285, 4, 70), (3, 300, 4, 70),
                                            (150000, 1000000, 4, 67), (60, 60, 3, 9), (0, 5, 1, 1)])
def test_betabinom_tail_matches_the_sum_of_scipys_pmf(at_least, m, a, b):
    """(scipy's own ``sf`` is off by 1.6e-4 relative at 101 of 285: the sum of its pmf agrees with mpmath.)"""
    from scipy.stats import betabinom

    exact = float(betabinom.pmf(np.arange(max(at_least, 0), m + 1), m, a, b).sum())
    assert betabinom_sf(at_least, m, a, b) == pytest.approx(exact, rel=1e-6, abs=1e-300)
