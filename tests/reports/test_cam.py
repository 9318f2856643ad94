"""Class activation maps of the default network (markerpatch) from its exported ONNX graph: the tiles'
own logits, placed where the tiles were cut, and the whole-image branch's CAM, from one forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mammoflag.preprocess import PATCH, candidates, letterbox, letterbox_coords, model_input_batch, tophat

SIZE = 256


def _display(seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """A portrait 'mammogram' (letterboxed with side margins): dim noise, a few faint specks, one bright blob."""
    rng = np.random.default_rng(seed)
    d = rng.integers(10, 50, size=(720, 480), dtype=np.uint8)
    for y, x in rng.integers(40, 440, size=(12, 2)):
        d[y:y + 3, x:x + 3] = 90  # faint specks: other candidates, other tiles
    blob = (530, 380)
    yy, xx = np.ogrid[:720, :480]
    d[(yy - blob[0]) ** 2 + (xx - blob[1]) ** 2 <= 25] = 255
    return d, blob


@pytest.fixture(scope="module")
def markerpatch(tmp_path_factory):
    import torch

    from training.export import export_onnx
    from training.network import build_network

    torch.manual_seed(0)
    net = build_network("markerpatch", 2).eval()
    display, blob = _display()
    batch = model_input_batch([display], SIZE)
    body, head = net[0], net[1]
    with torch.no_grad():
        feats = body(torch.from_numpy(batch.astype(np.float32)))
        tiles = feats[0, head.image_features:].reshape(-1, head.tile_features)
        # the blob's tile: the candidate nearest to the blob (tile n is the n-th candidate)
        centres = candidates(tophat(display), (SIZE // PATCH) ** 2)
        blob_tile = int(np.argmin(((centres - np.array(blob)) ** 2).sum(axis=1)))
        others = torch.ones(len(tiles), dtype=torch.bool)
        others[blob_tile] = False
        direction = tiles[blob_tile] - tiles[others].mean(dim=0)
        head.tile.weight.zero_()
        head.tile.bias.zero_()
        head.image.weight.zero_()
        head.image.bias.zero_()
        head.tile.weight[0] = direction / direction.norm() * 3.0  # class 0: fires on the blob's tile
        head.image.weight[1] = torch.randn(head.image_features) * 0.05  # class 1: the image branch only
    path = export_onnx(net, tmp_path_factory.mktemp("cam") / "model.onnx", SIZE)
    return {"net": net, "onnx": path, "display": display, "blob": blob, "blob_tile": blob_tile, "batch": batch,
            "centres": centres}


def test_letterbox_coords_follow_the_letterbox():
    d = np.zeros((720, 480), np.uint8)
    d[500:520, 300:320] = 255
    lb = letterbox(d, SIZE)
    ys, xs = np.nonzero(lb > 127)
    (top, left), (bottom, right) = letterbox_coords(np.array([[500, 300], [520, 320]]), d.shape, SIZE)
    assert abs(ys.min() - top) <= 1 and abs(ys.max() + 1 - bottom) <= 1
    assert abs(xs.min() - left) <= 1 and abs(xs.max() + 1 - right) <= 1
    assert left > 40  # the portrait image is centred between black margins


def test_markerpatch_maps_peak_on_the_firing_tile(markerpatch):
    import torch

    from reports.cam import class_maps, forward, load_cam_model
    from training.export import onnx_logits

    cam = load_cam_model(markerpatch["onnx"])
    assert cam.tile_logits_name is not None
    batch = markerpatch["batch"]
    out = forward(cam, batch)
    # the logits are the served ones; the tile logits are head.tile on each tile's features
    assert np.allclose(out.logits, onnx_logits(markerpatch["onnx"], batch), atol=1e-5)
    net = markerpatch["net"]
    with torch.no_grad():
        feats = net[0](torch.from_numpy(batch.astype(np.float32)))
        tiles = feats[:, net[1].image_features:].reshape(1, -1, net[1].tile_features)
        expected = net[1].tile(tiles).numpy()
    assert out.tile_logits is not None and np.allclose(out.tile_logits, expected, atol=1e-4)
    assert int(out.tile_logits[0, :, 0].argmax()) == markerpatch["blob_tile"]

    logits, maps = class_maps(cam, batch, [markerpatch["display"]])
    assert maps.shape == (1, 2, SIZE, SIZE)
    peak = np.unravel_index(maps[0, 0].argmax(), maps[0, 0].shape)
    (by, bx), = letterbox_coords(np.array([markerpatch["blob"]]) + 0.5, markerpatch["display"].shape, SIZE)
    tile_side = PATCH * SIZE / max(markerpatch["display"].shape)
    assert abs(peak[0] + 0.5 - by) <= tile_side / 2 + 1 and abs(peak[1] + 0.5 - bx) <= tile_side / 2 + 1
    # class 1 has no tile weights: its map is the image branch's CAM alone, whose spatial mean of the
    # average-pooled half is that half's logit
    assert np.allclose(out.tile_logits[0, :, 1], 0.0)
    w = cam.weights[1].reshape(2, -1)  # [max copy, mean copy] of each channel
    feats_map = cam.session.run([cam.features_name], {cam.input_name: batch.astype(np.float32)})[0][0]
    assert logits[0, 1] == pytest.approx(float(w[0] @ feats_map.max(axis=(1, 2)) + w[1] @ feats_map.mean(axis=(1, 2))),
                                         abs=1e-4)
    assert np.allclose(out.image_maps[0, 1], np.einsum("c,chw->hw", w.sum(axis=0), feats_map), atol=1e-4)


def test_a_tiled_model_needs_the_displays(markerpatch):
    from reports.cam import class_maps, load_cam_model

    with pytest.raises(ValueError, match="display images"):
        class_maps(load_cam_model(markerpatch["onnx"]), markerpatch["batch"])


def test_cam_still_refuses_a_graph_without_a_linear_head(tmp_path):
    import torch
    from torch import nn

    from reports.cam import NoCam, load_cam_model

    class NoHead(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x[:, :2].amax(dim=(2, 3)))

    path = tmp_path / "nohead.onnx"
    torch.onnx.export(NoHead(), (torch.zeros(1, 5, 64, 64),), str(path), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    with pytest.raises(NoCam):
        load_cam_model(Path(path))


def test_report_on_a_markerpatch_version_draws_maps(markerpatch, tmp_path):
    """`mammoflag report` (make_report) on a registered markerpatch version: map thumbnails, not 'No maps'."""
    import shutil

    from PIL import Image

    from label_config import load_label_config
    from mammoflag.card import stand_in_card
    from mammoflag.paths import task_url_for
    from mammoflag.registry import FP32_FILE, Registry
    from mammoflag.spec import ModelSpec
    from reports.inputs import records_from_tasks
    from reports.run import make_report

    spec = ModelSpec.from_label_config(load_label_config(), input_size=SIZE)
    assert spec.architecture == "markerpatch"
    data_root, models = tmp_path / "data", tmp_path / "models"
    reg = Registry(models)
    with reg.staging() as staging:
        shutil.copy(markerpatch["onnx"], staging / FP32_FILE)
        version = reg.publish(staging, stand_in_card(spec, "markerpatch with hand-set head weights"))
    reg.set_current(version.name)
    tasks = []
    for i in range(4):
        display = markerpatch["display"] if i % 2 == 0 else _display(seed=i)[0]
        png = data_root / "siteA" / "images" / f"{i:03d}" / "0.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(display).save(png)
        tasks.append({"id": 200 + i, "data": {"image": task_url_for(png, data_root), "key": f"1.2.4.{i}:0"},
                      "annotations": [{"id": 2000 + i, "completed_by": 1, "created_at": "2099-01-01T00:00:00Z",
                                       "was_cancelled": False, "result": [
                                           {"from_name": spec.choices_name, "to_name": spec.image_name,
                                            "type": "choices", "value": {"choices": ["biopsy_tool"]}}]}]})
    records = records_from_tasks(tasks, spec, data_root)
    result = make_report(records, reg, "markerpatch report", tmp_path / "out", resamples=50)
    html = result.index.read_text()
    assert "No maps" not in html
    cams = sorted((tmp_path / "out" / "cams").glob("task-*.png"))
    assert cams and html.count('class="cam"') == len(cams)
    # the blob image's biopsy_tool map is brightest at the blob's tile
    blob_map = tmp_path / "out" / "cams" / "task-200-biopsy_tool.png"
    assert blob_map.exists()  # every image is flagged for biopsy_tool by the tile it fires on
    heat = np.asarray(Image.open(blob_map).convert("RGB"), dtype=np.float64)
    base = np.asarray(Image.fromarray(markerpatch["batch"][0, 0]).convert("RGB").resize((256, 256)),
                      dtype=np.float64)
    diff = np.abs(heat - base).sum(axis=2)
    peak = np.unravel_index(diff.argmax(), diff.shape)
    (by, bx), = letterbox_coords(np.array([markerpatch["blob"]]) + 0.5, markerpatch["display"].shape, SIZE)
    assert abs(peak[0] - by) <= 12 and abs(peak[1] - bx) <= 12
