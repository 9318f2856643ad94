"""mammoflag.novelty: the reference, an image's novelty, and the cohort shift test's error rates."""

from __future__ import annotations

import numpy as np
import pytest

from mammoflag.novelty import (MIN_VALIDATION, SHIFT_ALPHA, NoveltyReference, fit_reference, nearest_distances,
                               novelty_path, shift_test)


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


@pytest.mark.parametrize("cohort_size", [60, 2000])
def test_same_source_cohorts_rarely_alarm_and_shifted_ones_do(cohort_size):
    """Over many draws: a cohort from the labels' own source alarms at about the test's level or less,
    one whose images are moved (another site's processing) alarms nearly always."""
    rng = np.random.default_rng(4)
    alarms_same = alarms_shifted = 0
    draws = 200
    for _ in range(draws):
        ref = fit_reference("model.onnx", _cloud(rng, 250), _cloud(rng, 70))
        same = ref.novelty(_cloud(rng, cohort_size))
        moved = ref.novelty(_cloud(rng, cohort_size, shift=1.5, spread=1.3))
        alarms_same += shift_test(len(same), int((same > 1).sum()), ref.k, ref.n_validation).shifted
        alarms_shifted += shift_test(len(moved), int((moved > 1).sum()), ref.k, ref.n_validation).shifted
    assert alarms_same <= max(2, 5 * SHIFT_ALPHA * draws)
    assert alarms_shifted >= 0.95 * draws


def test_shift_test_text_names_the_share_and_the_expectation():
    t = shift_test(1000, 400, 4, 79)
    assert t.shifted and t.p_value < 1e-6
    assert "400 of 1000 images (40.0 %)" in t.explain() and "5 % expected" in t.explain()
    calm = shift_test(1000, 50, 4, 79)
    assert not calm.shifted and "no sign" in calm.explain()
    assert shift_test(0, 0, 4, 79).p_value == 1.0
