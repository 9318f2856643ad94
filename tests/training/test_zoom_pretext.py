"""The whole-image body's self-supervised start (training/pretext.py: the zoom pretext) and how training uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.pretext import AIR_LEVEL, ZoomConfig, pretrain_image_body, zoom_crops


def _breast(rng: np.random.Generator, h: int = 256, w: int = 200, cell: float = 6.0) -> np.ndarray:
    """A display image: a half-disc of blob texture (``cell`` px structures) against black air."""
    import cv2

    noise = rng.normal(0, 1, (h, w)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), cell)
    texture = 120 + 45 * texture / (texture.std() + 1e-6) + rng.normal(0, 3, (h, w))
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (0.48 * h)) ** 2 + (xx / (0.95 * w)) ** 2 < 1
    return np.where(inside, np.clip(texture, 20, 255), 0).astype(np.uint8)


def test_zoom_crops_are_the_whole_image_then_windows_mostly_of_tissue():
    rng = np.random.default_rng(0)
    display = _breast(rng)
    config = ZoomConfig(crops_per_image=4)
    planes, zooms = zoom_crops(rng, display, 64, config)
    assert planes.shape == (5, 3, 64, 64) and planes.dtype == np.uint8
    assert zooms.dtype == np.float32 and zooms[0] == 0.0
    assert (zooms[1:] >= np.log(config.zoom[0]) - 0.02).all() and (zooms[1:] <= np.log(config.zoom[1]) + 0.02).all()
    from mammoflag.preprocess import model_input

    # the whole image's planes are exactly what the network sees of it at serving time
    assert np.array_equal(planes[0], model_input(display, 64)[:3])
    # a zoomed window lies mostly over tissue: the letterboxed area plane is mostly above the air level
    for p in planes[1:]:
        assert (p[0] >= AIR_LEVEL).mean() > 0.4


def test_zoom_regressor_tells_the_zoom_of_images_it_never_saw():
    """Trained on crops of some images, the regressor orders crops of other images by their zoom."""
    import torch

    from training.network import ARCHITECTURES, ImageBody

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    config = ZoomConfig(steps=120, batch=16, crops_per_image=3, seed=0)
    train = [zoom_crops(rng, _breast(rng), 64, config) for _ in range(24)]
    body = ImageBody(ARCHITECTURES["markerpatch"])
    w, b = pretrain_image_body(body, 2 * ARCHITECTURES["markerpatch"].widths[-1],
                               np.concatenate([p for p, _ in train]), np.concatenate([z for _, z in train]), config)
    held = [zoom_crops(rng, _breast(rng), 64, config) for _ in range(10)]
    x, z = np.concatenate([p for p, _ in held]), np.concatenate([z for _, z in held])
    with torch.no_grad():
        predicted = body(torch.from_numpy(x).float()).numpy() @ w + b
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(predicted), rank(z))[0, 1] > 0.6  # Spearman


def test_zoom_start_rule():
    from label_config import FindingKind
    from training.train import ZOOM_CLASS_AUROC, zoom_start_for

    assert zoom_start_for(FindingKind.VIEW, None).zoom
    assert not zoom_start_for(FindingKind.OBJECT, 0.99).zoom
    assert zoom_start_for(None, ZOOM_CLASS_AUROC).zoom
    assert not zoom_start_for(None, ZOOM_CLASS_AUROC - 0.01).zoom
    assert not zoom_start_for(None, None).zoom
    assert zoom_start_for(FindingKind.VIEW, 0.8123).to_json() == {"start": "zoom", "zoom_auroc": 0.812,
                                                                  "decided_by": "label config: view"}


def _inputs(tmp_path: Path, n: int = 12):
    from PIL import Image

    from mammoflag.preprocess import model_input
    from training.dataset import LabelledImage
    from training.train import Inputs

    rng = np.random.default_rng(2)
    items, xs = [], []
    for i in range(n):
        display = _breast(rng, cell=12.0 if i % 2 else 5.0)  # the odd ones 'magnified'
        path = tmp_path / f"{i}.png"
        Image.fromarray(display).save(path)
        xs.append(model_input(display, 64))
        items.append(LabelledImage(task_id=i, key=f"k{i}:0", image=path, target=(float(i % 2), 0.0), group=f"p{i}",
                                   readers=1))
    y = np.array([it.target for it in items], np.float32)
    return Inputs(np.stack(xs), y, tuple(items))


def test_training_starts_the_image_body_from_the_zoom_cache_and_keeps_it_frozen(tmp_path, monkeypatch):
    """Two learners on one registry: the first pretrains and caches, the second reads the cache; a declared view
    starts its image classifier as the zoom regressor, a declared object as initialised; the image body does
    not move in a fit (zoom_tuned off), and does with zoom_tuned."""
    import torch

    from label_config import FindingKind
    from mammoflag.registry import Registry
    from mammoflag.spec import ModelSpec
    from training.train import TrainConfig, _zoom_start, build_learner, fit

    train = _inputs(tmp_path)
    x, y = train.x, train.y
    spec = ModelSpec(classes=("a", "b"), negative="neither", choices_name="findings", image_name="image",
                     image_key="image", kinds={"a": FindingKind.VIEW, "b": FindingKind.OBJECT})
    config = TrainConfig(architecture="markerpatch", epochs=1, batch_size=4, zoom_steps=6, augment=False,
                         quantize_int8=False, threads=1)
    registry = Registry(tmp_path / "models")
    first = build_learner(x, y, x, y, 2, config)
    init_b = first.model[1].image.weight[1].detach().clone()
    source, starts = _zoom_start(first, config, train, registry, spec)
    assert source == "zoom:6"
    assert starts["a"].zoom and starts["a"].decided_by == "label config: view"
    assert not starts["b"].zoom and starts["b"].zoom_auroc is None  # class b has no positives
    assert torch.equal(first.model[1].image.weight[1], init_b)  # an object's image classifier: as initialised
    second = build_learner(x, y, x, y, 2, config)
    assert _zoom_start(second, config, train, registry, spec)[0] == "zoom:cached:6"
    a, b = first.model[0].image.state_dict(), second.model[0].image.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(first.model[1].image.weight[0], second.model[1].image.weight[0])
    assert second.model[1].image.weight[0].abs().sum() > 0
    with monkeypatch.context() as m:  # a release whose zoom pretext changed does not reuse the old body
        m.setattr("training.pretext.ZOOM_PRETEXT_VERSION", "zoom-v0-test")
        assert _zoom_start(build_learner(x, y, x, y, 2, config), config, train, registry, spec)[0] == "zoom:6"
    before = {k: v.clone() for k, v in second.model[0].image.state_dict().items()}
    head_before = second.model[1].image.weight.detach().clone()
    fit(second, x, y, x, y, config, pretrained=False)
    after = second.model[0].image.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert not torch.equal(second.model[1].image.weight, head_before)  # the classifier on top does learn
    tuned_config = TrainConfig(architecture="markerpatch", epochs=1, batch_size=4, zoom_steps=6, augment=False,
                               quantize_int8=False, threads=1, zoom_tuned=True)
    tuned = build_learner(x, y, x, y, 2, tuned_config)
    _zoom_start(tuned, tuned_config, train, registry, spec)
    before = {k: v.clone() for k, v in tuned.model[0].image.state_dict().items()}
    fit(tuned, x, y, x, y, tuned_config, pretrained=False)
    assert not all(torch.equal(before[k], v) for k, v in tuned.model[0].image.state_dict().items())
    assert TrainConfig.from_knobs({"zoom_steps": "0", "zoom_tuned": "1"}) == TrainConfig(zoom_steps=0,
                                                                                          zoom_tuned=True)


@pytest.mark.parametrize("steps", [0])
def test_no_zoom_pretext_when_switched_off(tmp_path, steps):
    from mammoflag.registry import Registry
    from mammoflag.spec import ModelSpec
    from training.train import TrainConfig, _zoom_start, build_learner

    train = _inputs(tmp_path, 4)
    spec = ModelSpec(classes=("a", "b"), negative="neither", choices_name="findings", image_name="image",
                     image_key="image")
    config = TrainConfig(architecture="markerpatch", zoom_steps=steps, threads=1)
    learn = build_learner(train.x, train.y, train.x, train.y, 2, config)
    assert _zoom_start(learn, config, train, Registry(tmp_path / "models"), spec) == ("", {})
    assert not (tmp_path / "models" / "pretext").exists()
