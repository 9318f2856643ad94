"""Diversity of the active-learning queue: near-duplicates interleave instead of coming in a row."""

from __future__ import annotations

import numpy as np

from ml_backend.diversity import RankedItem, average_hash, diversified_scores, group_ids


def test_same_study_or_same_image_hash_form_one_group():
    a, b = b"\x01" * 8, b"\x02" * 8
    items = [RankedItem(0.1, "S1", a), RankedItem(0.2, "S1", b), RankedItem(0.3, "S2", b),
             RankedItem(0.4, "S3", None), RankedItem(0.5, None, None), RankedItem(0.6, "", None)]
    g = group_ids(items)
    assert g[0] == g[1] == g[2]  # S1 shares a hash with S2: one chain
    assert len({g[0], g[3], g[4], g[5]}) == 4  # unknown study and hash: each on its own


def test_scores_serve_one_member_per_group_first_and_stay_in_unit_range():
    items = [RankedItem(0.05, "A", None), RankedItem(0.10, "A", None), RankedItem(0.15, "A", None),
             RankedItem(0.30, "B", None), RankedItem(0.90, "C", None)]
    scores = diversified_scores(items)
    assert all(0 <= s <= 1 for s in scores)
    order = sorted(range(len(items)), key=scores.__getitem__)
    assert order == [0, 3, 4, 1, 2]  # A's least certain, then B, C, and only then A's other views
    assert scores[0] == round(0.05 / 3, 6)


def test_average_hash_matches_near_identical_images_only():
    rng = np.random.default_rng(0)
    # a mammogram-like layout: bright breast on the left, dark background, one bright marker
    img = np.full((96, 64), 10, np.uint8)
    img[:, :40] = 140
    img[40:50, 20:30] = 250
    noisy = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)  # re-export noise
    mirrored = img[:, ::-1].copy()  # the other breast: a different image
    assert average_hash(img) == average_hash(noisy)
    assert average_hash(img) != average_hash(mirrored)
    assert len(average_hash(img)) == 8
