"""ONNX export: dynamic batch, parity with torch on real inputs, and the check failing on a tampered model."""

from __future__ import annotations

import numpy as np
import pytest

from drawing import draw_display
from mammoflag.preprocess import model_input_batch
from training.export import ParityError, check_parity, export_onnx, onnx_logits


@pytest.fixture(scope="module")
def small_model():
    import torch

    from training.network import DEFAULT_ARCHITECTURE, build_network

    torch.manual_seed(0)
    return build_network(DEFAULT_ARCHITECTURE, 2).eval()


@pytest.fixture(scope="module")
def real_inputs():
    rng = np.random.default_rng(0)
    displays = [draw_display(rng, bool(i % 2), bool(i % 3 == 0)) for i in range(6)]
    return model_input_batch(displays, 64)


def test_export_has_a_dynamic_batch_and_matches_torch(tmp_path, small_model, real_inputs, spec):
    path = export_onnx(small_model, tmp_path / "m.onnx", 64)
    assert onnx_logits(path, real_inputs[:1]).shape == (1, 2)
    assert onnx_logits(path, real_inputs, batch_size=5).shape == (6, 2)
    assert check_parity(path, small_model, real_inputs, spec) <= 1e-4


def test_parity_check_fails_on_a_tampered_model(tmp_path, small_model, real_inputs, spec):
    import onnx
    from onnx import numpy_helper

    path = export_onnx(small_model, tmp_path / "m.onnx", 64)
    model = onnx.load(str(path))
    # nudge the last linear layer's weights, as a corrupted or mismatched file would be
    from training.network import ARCHITECTURES, DEFAULT_ARCHITECTURE

    features = 2 * ARCHITECTURES[DEFAULT_ARCHITECTURE].widths[-1]  # the whole-image head: Linear(features, 2)
    target = next(t for t in model.graph.initializer if sorted(t.dims) == [2, features])
    tampered = numpy_helper.to_array(target) * 1.5 + 0.01
    target.CopyFrom(numpy_helper.from_array(tampered.astype(np.float32), target.name))
    onnx.save(model, str(path))
    with pytest.raises(ParityError, match=r"m.onnx: ONNX probabilities differ from torch by up to [0-9.e-]+") as err:
        check_parity(path, small_model, real_inputs, spec)
    assert err.value.max_difference > 1e-4


def test_configured_imagenet_weights_are_loaded_and_auto_mode_alternates(tmp_path, spec):
    """A local weights file (here: a torchvision ResNet18 state dict) becomes the body; 'auto' picks
    head-only refits from the parent until the labels grow by refit_growth."""
    import torch
    from torchvision.models import resnet18

    from dataclasses import replace

    from mammoflag.card import stand_in_card
    from mammoflag.registry import ModelVersion
    from training.train import TORCH_WEIGHTS_FILE, TrainConfig, _initialise, build_learner, resolve_mode

    torch.manual_seed(1)
    reference = resnet18()
    weights = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), weights)
    x = np.zeros((4, 3, 64, 64), np.float32)
    y = np.zeros((4, 2), np.float32)
    config = TrainConfig(pretrained_weights=weights)
    learn = build_learner(x, y, x, y, 2, config)
    assert _initialise(learn, config, None, spec) == "imagenet:resnet18-local.pth"
    assert torch.equal(learn.model[0][0].weight, reference.conv1.weight)

    parent_dir = tmp_path / "v0001-x"
    parent_dir.mkdir()
    torch.save(learn.model.state_dict(), parent_dir / TORCH_WEIGHTS_FILE)
    stand_in = stand_in_card(spec, "parent of the auto-mode test")
    parent = ModelVersion(parent_dir, replace(stand_in, version="v0001-x",
                                              training=replace(stand_in.training, full_fine_tune_labels=100)))
    auto = TrainConfig(mode="auto")
    assert resolve_mode(auto, None, spec, 120) == "fine_tune"
    assert resolve_mode(auto, parent, spec, 149) == "head_only"
    assert resolve_mode(auto, parent, spec, 150) == "fine_tune"
    assert _initialise(learn, TrainConfig(mode="head_only"), parent, spec) == "parent:v0001-x"
