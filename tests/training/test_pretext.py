"""The tile network's self-supervised start (training/pretext.py) and how training uses it."""

from __future__ import annotations

import numpy as np
import pytest

from training.pretext import (PretextConfig, candidate_tiles, draw_object, over_tissue, paste, pretext_batch,
                              pretrain_tile_body)


def _tissue_tiles(n: int, seed: int) -> np.ndarray:
    """(n, 2, 32, 32) tiles of smooth random 'tissue' with noise, and their (approximate) top-hat."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 2, 32, 32), np.uint8)
    for i in range(n):
        base = cv2.GaussianBlur(rng.normal(0, 1, (32, 32)).astype(np.float32), (0, 0), rng.uniform(2, 6))
        d = np.clip(110 + 40 * base / (base.std() + 1e-6) + rng.normal(0, 3, (32, 32)), 0, 255)
        out[i, 0] = d.astype(np.uint8)
        out[i, 1] = np.clip(d - cv2.erode(d.astype(np.float32), np.ones((9, 9), np.uint8)), 0, 255).astype(np.uint8)
    return out


def test_objects_are_drawn_inside_the_tile_at_every_kind():
    config = PretextConfig()
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(300):
        cov = draw_object(rng, config)
        assert cov.shape == (32, 32) and cov.dtype == np.float32
        assert 0.0 <= cov.min() and cov.max() <= 1.0
        assert cov.sum() > 0.5  # something was drawn
        areas.append(cov.sum())
    assert np.percentile(areas, 90) > 4 * np.percentile(areas, 10)  # sizes and strokes vary widely


def test_paste_brightens_display_and_tophat_only_where_the_object_is():
    rng = np.random.default_rng(1)
    tiles = _tissue_tiles(20, 1)
    for d, h in tiles:
        nd, nh = paste(rng, d, h, PretextConfig())
        changed = nd.astype(int) - d
        assert changed.min() >= -4  # noise on the object only; nothing darker
        assert (changed > 4).any()
        assert ((nh.astype(int) - h) >= -4).all()
        # what the display gained, the top-hat gained (within the clipping at 255)
        grew = changed > 4
        assert ((nh.astype(int) - h)[grew] > 0).mean() > 0.9


def _letters_on_air(n: int, seed: int) -> np.ndarray:
    """(n, 2, 32, 32) tiles of burned-in text: white strokes on black air; the top-hat is the strokes."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 2, 32, 32), np.uint8)
    for i in range(n):
        cv2.putText(out[i, 0], "RLCM"[i % 4], (int(rng.integers(2, 10)), int(rng.integers(22, 30))),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.9, 255, 2)
        out[i, 1] = out[i, 0]
    return out


def test_tiles_over_air_are_told_from_tiles_over_tissue():
    tissue, letters = _tissue_tiles(30, 2), _letters_on_air(12, 2)
    rng = np.random.default_rng(2)
    marked = np.stack([np.stack(paste(rng, d, h, PretextConfig())) for d, h in tissue])
    assert over_tissue(tissue).all()
    assert over_tissue(marked).all()  # an object over tissue is in the top-hat, not in the background
    assert not over_tissue(letters).any()  # a letter is bright, but the background under it is black


def test_pretext_batches_paste_over_tissue_only():
    tiles = np.concatenate([_tissue_tiles(20, 3), _letters_on_air(20, 3)])
    tissue = over_tissue(tiles)
    rng = np.random.default_rng(3)
    targets = 0
    for _ in range(5):
        batch, target = pretext_batch(rng, tiles, tissue, PretextConfig(batch=64))
        assert batch.shape == (64, 2, 32, 32) and target.shape == (64,)
        air = ~over_tissue(batch) & ~target
        # the letters come back as they were: each is one of the air tiles, untouched, and never a target
        for b in batch[air]:
            assert any(np.array_equal(b, a) for a in tiles[~tissue])
        targets += int(target.sum())
        assert not (target & ~over_tissue(batch)).any()
    assert 60 < targets < 110  # about half of the ~half over tissue: 5 x 64 x 0.25 = 80
    # before v2 the pretext pasted over air too: the option keeps that measurable (benchmarks/bench_pretext.py)
    _, target = pretext_batch(np.random.default_rng(3), tiles, np.ones(len(tiles), bool), PretextConfig(batch=64))
    assert target.sum() > 20


def test_candidate_tiles_are_the_nonblank_tiles():
    x = np.zeros((2, 5, 64, 64), np.uint8)
    x[0, 3, :32, :32] = 7  # tile (0, 0) of image 0
    x[1, 4, 32:, 32:] = 9  # tile (1, 1) of image 1 (top-hat plane only)
    t = candidate_tiles(x, (3, 4))
    assert t.shape == (2, 2, 32, 32)
    assert (t[0, 0] == 7).all() and (t[1, 1] == 9).all()


def test_pretext_detector_finds_pasted_objects_on_tiles_it_never_saw():
    """Trained on one set of tiles, the returned detector ranks pasted over clean tiles of another set."""
    import torch

    from training.calibrate import auroc
    from training.network import ARCHITECTURES, TileBody

    torch.manual_seed(0)
    body = TileBody(ARCHITECTURES["markerpatch"], 32).net
    w, b = pretrain_tile_body(body, 2 * ARCHITECTURES["markerpatch"].tile_widths[-1], _tissue_tiles(300, 2),
                              PretextConfig(steps=80, batch=64, seed=0))
    held = _tissue_tiles(120, 3)
    rng = np.random.default_rng(4)
    target = np.arange(len(held)) % 2 == 1
    for j in np.flatnonzero(target):
        held[j, 0], held[j, 1] = paste(rng, held[j, 0], held[j, 1], PretextConfig())
    with torch.no_grad():
        z = body(torch.from_numpy(held).float()).numpy() @ w + b
    assert auroc(z, target.astype(float)) > 0.85


@pytest.mark.slow
def _spec(kinds=None):
    from mammoflag.spec import ModelSpec

    return ModelSpec(classes=("a", "b"), negative="neither", choices_name="findings", image_name="image",
                     image_key="image", kinds=kinds or {})


def test_training_starts_tiles_from_the_pretext_cache_and_keeps_them_frozen(tmp_path, monkeypatch):
    """Two learners on one registry: the first pretrains and caches, the second reads the cache; the tile
    body does not move in a fit, and an undeclared class the detector ranks starts its tile classifier as the
    detector."""
    import torch

    from mammoflag.registry import Registry
    from training.train import TrainConfig, _pretext_start, build_learner, fit

    rng = np.random.default_rng(0)
    x = rng.integers(0, 120, (24, 5, 64, 64), dtype=np.uint8)
    x[:12, 3, :32, :32] = 250  # something bright in one tile of the positives
    y = np.zeros((24, 2), np.float32)
    y[:12, 0] = 1
    config = TrainConfig(architecture="markerpatch", epochs=1, batch_size=8, pretext_steps=12, augment=False,
                         quantize_int8=False, threads=1)
    registry = Registry(tmp_path / "models")
    spec = _spec()
    first = build_learner(x[:16], y[:16], x[16:], y[16:], 2, config)
    assert _pretext_start(first, config, x[:16], y[:16], registry, spec)[0] == "pretext:12"
    second = build_learner(x[:16], y[:16], x[16:], y[16:], 2, config)
    source, starts = _pretext_start(second, config, x[:16], y[:16], registry, spec)
    assert source == "pretext:cached:12"
    assert starts["a"].detector and starts["a"].decided_by == "training images" and starts["a"].detector_auroc > 0.5
    assert not starts["b"].detector and starts["b"].detector_auroc is None  # no positives: nothing to rank
    with monkeypatch.context() as m:  # a release whose pretext changed does not reuse the old body
        m.setattr("training.pretext.PRETEXT_VERSION", "paste-objects-v0-test")
        other = build_learner(x[:16], y[:16], x[16:], y[16:], 2, config)
        assert _pretext_start(other, config, x[:16], y[:16], registry, spec)[0] == "pretext:12"
    a = first.model[0].tiles.state_dict()
    b = second.model[0].tiles.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tile_w = second.model[1].tile.weight.detach().clone()
    assert tile_w[0].abs().sum() > 0  # class a (a bright spot in one tile) starts as the detector ...
    assert (tile_w[1] == 0).all()  # ... class b (no positives: nothing to rank) at zero
    before = {k: v.clone() for k, v in second.model[0].tiles.state_dict().items()}
    fit(second, x[:16], y[:16], x[16:], y[16:], config, pretrained=False)
    after = second.model[0].tiles.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert not torch.equal(second.model[1].tile.weight, tile_w)  # the classifier on top does learn
    assert TrainConfig.from_knobs({"pretext_steps": "0"}).pretext_steps == 0


def test_a_declared_kind_decides_the_tile_start_whatever_the_training_images_say(tmp_path):
    """The label config's kind is the prior where ~13 positives cannot decide: an object class starts as the
    detector even when its training images do not show it (here: no positives at all), a whole-field class
    starts at zero even when the detector ranks it perfectly."""
    from label_config import FindingKind
    from mammoflag.registry import Registry
    from training.train import TrainConfig, _pretext_start, build_learner

    rng = np.random.default_rng(1)
    x = rng.integers(0, 120, (16, 5, 64, 64), dtype=np.uint8)
    x[:8, 3, :32, :32] = 250
    y = np.zeros((16, 2), np.float32)
    y[:8, 0] = 1
    config = TrainConfig(architecture="markerpatch", epochs=1, batch_size=8, pretext_steps=12, augment=False,
                         quantize_int8=False, threads=1)
    learn = build_learner(x, y, x, y, 2, config)
    spec = _spec({"a": FindingKind.VIEW, "b": FindingKind.OBJECT})
    _, starts = _pretext_start(learn, config, x, y, Registry(tmp_path / "models"), spec)
    assert starts["a"].detector_auroc > 0.5 and not starts["a"].detector
    assert starts["a"].decided_by == "label config: view"
    assert starts["b"].detector and starts["b"].decided_by == "label config: object"
    w = learn.model[1].tile.weight.detach()
    assert (w[0] == 0).all() and w[1].abs().sum() > 0
    assert starts["b"].to_json() == {"start": "detector", "detector_auroc": None, "decided_by": "label config: object"}


def test_tile_start_rule():
    from label_config import FindingKind
    from training.train import PRETEXT_CLASS_AUROC, tile_start_for

    assert tile_start_for(None, PRETEXT_CLASS_AUROC).detector
    assert not tile_start_for(None, PRETEXT_CLASS_AUROC - 0.01).detector
    assert not tile_start_for(None, None).detector
    assert tile_start_for(FindingKind.OBJECT, 0.2).detector
    assert not tile_start_for(FindingKind.VIEW, 0.99).detector
