"""The queue before any model: one typical image per cluster first, largest cluster first, outliers last."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.typical import THUMB, appearance, order_scores, typical_diverse_order


def _blobs(rng: np.random.Generator, sizes: tuple[int, ...], dim: int = 24, spread: float = 0.3):
    """Gaussian blobs far apart (and a few far outliers); (embeddings, blob of each row, -1 = outlier)."""
    centres = rng.normal(0, 10, (len(sizes), dim))
    rows, blob = [], []
    for b, n in enumerate(sizes):
        rows.append(centres[b] + rng.normal(0, spread, (n, dim)))
        blob += [b] * n
    outliers = rng.normal(0, 30, (3, dim))
    return np.concatenate(rows + [outliers]), np.array(blob + [-1] * 3)


def test_first_picks_are_one_typical_member_of_each_cluster_largest_first():
    rng = np.random.default_rng(0)
    x, blob = _blobs(rng, (40, 25, 12))
    order = typical_diverse_order(x, clusters=3)
    assert sorted(order) == list(range(len(x)))  # every row, once
    assert [blob[i] for i in order[:3]] == [0, 1, 2]  # one per blob, the largest blob first
    for i in order[:3]:  # each pick sits at its blob's centre, not at its rim
        members = np.flatnonzero(blob == blob[i])
        centre = x[members].mean(axis=0)
        distances = np.linalg.norm(x[members] - centre, axis=1)
        assert np.linalg.norm(x[i] - centre) <= np.quantile(distances, 0.5)
    assert order == typical_diverse_order(x, clusters=3)  # deterministic


def test_every_cluster_gets_its_turn_before_any_gets_a_third():
    rng = np.random.default_rng(1)
    x, blob = _blobs(rng, (50, 30, 20, 10))
    order = typical_diverse_order(x, clusters=4)
    firsts = [blob[i] for i in order[:8]]
    assert sorted(firsts) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(blob[order[-3:]]) != {0}  # the big blob does not hold the end of the order


def test_small_pools_and_degenerate_inputs():
    assert typical_diverse_order(np.zeros((0, 8))) == []
    assert typical_diverse_order(np.ones((1, 8))) == [0]
    same = typical_diverse_order(np.ones((7, 8)), clusters=50)  # identical rows: still every index, once
    assert sorted(same) == list(range(7))


def test_appearance_is_the_area_plane_reduced():
    plane = np.zeros((256, 256), np.uint8)
    plane[:, :128] = 200
    a = appearance(plane)
    assert a.shape == (THUMB * THUMB,) and a.dtype == np.float32
    grid = a.reshape(THUMB, THUMB)
    assert np.all(grid[:, : THUMB // 2] == 200) and np.all(grid[:, THUMB // 2:] == 0)
    with pytest.raises(ValueError, match="square"):
        appearance(np.zeros((256, 128), np.uint8))


def test_scores_follow_the_order_inside_label_studios_range():
    scores = order_scores([2, 0, 1], 3)
    assert sorted(range(3), key=scores.__getitem__) == [2, 0, 1]
    assert all(0 <= s < 1 for s in scores)
    assert order_scores([1], 3) == [1.0, 0.0, 1.0]  # not in the order: served after it
