"""The model input channels, the default network, its ONNX export and the training augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from mammoflag.preprocess import CHANNELS, model_input, model_input_batch


@pytest.mark.parametrize("seed", range(4))
def test_the_brightest_pixel_survives_any_reduction(seed):
    """A one-pixel wire anywhere, any display size, any input size: full brightness in max and top-hat."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        h, w = int(rng.integers(70, 1100)), int(rng.integers(70, 1100))
        size = int(rng.choice([64, 96, 200, 384, 512]))
        if size >= max(h, w):
            continue
        display = rng.integers(0, 60, (h, w), dtype=np.uint8)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        display[y, x] = 255
        m = model_input(display, size)
        assert m[CHANNELS.index("max")].max() == 255, (h, w, size, y, x)
        assert m[CHANNELS.index("tophat")].max() >= 255 - 60, (h, w, size, y, x)
        # area averaging dilutes it (what the max channel is there for)
        assert m[CHANNELS.index("area")].max() < 255 or size * 2 > max(h, w)


def test_model_input_is_uint8_letterboxed_and_tophat_ignores_broad_brightness():
    display = np.full((300, 150), 40, np.uint8)
    display[100:200, 30:120] = 200  # a broad bright region (dense tissue), far larger than any marker
    display[20:24, 60:64] = 230  # a small bright marker on fat
    x = model_input(display, 100)
    assert x.shape == (len(CHANNELS), 100, 100) and x.dtype == np.uint8
    assert (x[:3, :, :25] == 0).all() and (x[:3, :, 75:] == 0).all()  # 50 px wide content, centred
    hat = x[CHANNELS.index("tophat")]
    assert hat[5:10, :].max() > 150  # the marker stands out
    assert hat[40:60, 40:60].max() < 20  # the inside of the broad region does not
    assert model_input_batch([display, display], 100).shape == (2, len(CHANNELS), 100, 100)
    assert model_input_batch([], 100).dtype == np.uint8


def test_network_exports_to_onnx_int8_and_matches_torch(tmp_path):
    import torch

    from training.export import export_onnx, onnx_logits, quantize_static_int8, torch_logits
    from training.network import build_network

    torch.manual_seed(0)
    model = build_network("markerpatch", 2).eval()
    rng = np.random.default_rng(0)
    displays = [rng.integers(0, 200, (180, 140), dtype=np.uint8) for _ in range(6)]
    for d in displays[::2]:
        d[50:53, 40:43] = 255
    x = model_input_batch(displays, 128)
    with torch.no_grad():  # bn running stats of a random net: push them somewhere realistic
        model.train()
        for _ in range(3):
            model(torch.from_numpy(x.astype(np.float32)))
        model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", 128)
    ref = torch_logits(model, x)
    assert ref.shape == (6, 2)
    np.testing.assert_allclose(onnx_logits(path, x), ref, atol=1e-4)
    int8 = quantize_static_int8(path, tmp_path / "m.int8.onnx", x)
    q = onnx_logits(int8, x)
    assert q.shape == (6, 2) and np.isfinite(q).all()
    assert np.abs(q - ref).max() < 0.25 * (np.abs(ref).max() + 1)


def test_body_ends_in_pooled_features_for_head_only_refits():
    import torch

    from training.network import build_network, feature_size

    model = build_network("markerpatch", 2).eval()
    features = model[0](torch.zeros(3, len(CHANNELS), 96, 96))
    assert features.shape == (3, feature_size("markerpatch", tiles=(96 // 32) ** 2))
    assert model[1](features).shape == (3, 2)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("resnet1000", 2)


def test_shift_stays_within_the_margin():
    """The augmentation's shift never moves content out of the frame: a marker cut by the edge stays as cut."""
    import torch

    from training.train import _shift_within_margin

    torch.manual_seed(0)
    x = torch.zeros(3, 64, 64)
    x[:, 5:60, 12:50] = torch.rand(3, 55, 38) * 200 + 1
    x[1, 5, 49] = 255  # a marker at the content's corner
    for _ in range(50):
        y = _shift_within_margin(x, 10)
        assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)  # nothing lost
        assert y[1].max() == 255
    full = torch.ones(3, 32, 32)
    assert torch.equal(_shift_within_margin(full, 8), full)  # no margin: no shift


def test_epochs_follow_the_image_budget():
    from training.train import TrainConfig, epochs_for, frozen_epochs_for, resolve_architecture

    config = TrainConfig()
    assert resolve_architecture(config) == "markerpatch" and frozen_epochs_for(config) == 0
    assert epochs_for(config, 240) == round(config.train_image_passes / 240)
    assert epochs_for(config, 10) == config.max_epochs and epochs_for(config, 10**6) == config.min_epochs
    assert epochs_for(TrainConfig(epochs=2), 240) == 2
    with pytest.raises(ValueError, match="ARCHITECTURE"):
        TrainConfig.from_knobs({"architecture": "vgg"})


def test_tiles_hold_the_most_marker_like_spots_at_full_resolution():
    import cv2

    from mammoflag.preprocess import PATCH, candidates, tophat

    rng = np.random.default_rng(3)
    display = rng.integers(40, 80, (600, 480), dtype=np.uint8)
    for y, x in rng.integers(20, 460, (30, 2)):
        display[y, x] = 140  # scattered single bright pixels (noise, specks)
    cv2.circle(display, (200, 300), 6, 250, 2)  # a ring marker 13 px across: ~2 % of the long side
    cv2.circle(display, (2, 597), 7, 230, 2)  # a ring marker cut by the image corner (thin metal strokes)
    spots = candidates(tophat(display), 16)
    assert abs(spots[0][0] - 300) <= 6 and abs(spots[0][1] - 200) <= 6  # the ring is the strongest spot
    assert any(y >= 585 and x <= 15 for y, x in spots[:4])  # the cut marker is among the first
    x = model_input(display, 4 * PATCH)  # 4 x 4 tiles
    first = x[CHANNELS.index("patch"), :PATCH, :PATCH]
    assert first.max() == 250 and (first >= 200).sum() >= 30  # the ring, unreduced
    assert x[CHANNELS.index("patch_tophat"), :PATCH, :PATCH].max() > 150
    blank = model_input(np.zeros((300, 200), np.uint8), 4 * PATCH)
    assert not blank.any()  # no candidate: black tiles
