"""Small real artefacts for tests that need a model but not a trained one.

``tiny_model_version`` builds a tiny CNN in torch with hand-set weights that respond to
bright pixels (a stand-in for a metal biopsy marker), exports it to ONNX with a dynamic
batch axis and registers it, so the backend and flagger tests run a real ONNX model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

from mammoflag.card import GroupMetrics, Verdict, stand_in_card
from mammoflag.registry import FP32_FILE, ModelVersion, Registry
from mammoflag.spec import ModelSpec


def tiny_model_version(registry_root: Path, spec: ModelSpec, make_current: bool = True,
                       bias: float = -2.0, verdicts: Mapping[str, Verdict] | None = None,
                       validated_manufacturers: Sequence[str] = ()) -> ModelVersion:
    """A hand-set model (below); its card states ``verdicts`` and, when given, validation images from
    ``validated_manufacturers`` (five each, no figures)."""
    import torch
    from torch import nn

    n = len(spec.classes)

    from mammoflag.preprocess import CHANNELS, IMAGENET_MEAN, IMAGENET_STD

    class Tiny(nn.Module):
        """logit = sum_c((v/255 - mean_c)/std_c) + bias for the brightest display value v (the input's
        ``max`` channel, uint8-valued), as when the input was the grey image ImageNet-normalised thrice."""

        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.head = nn.Linear(1, n)
            self.scale = float((1 / (255 * IMAGENET_STD)).sum())
            self.shift = float((IMAGENET_MEAN / IMAGENET_STD).sum())

        def forward(self, x):
            return self.head(self.pool(x[:, 1:2]).flatten(1) * self.scale - self.shift)

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(bias)
    reg = Registry(registry_root)
    with reg.staging() as tmp:
        dummy = torch.zeros(1, len(CHANNELS), spec.input_size, spec.input_size)
        torch.onnx.export(model, (dummy,), str(tmp / FP32_FILE), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        card = stand_in_card(spec, "tiny hand-set test model", reg.current_name(), verdicts=verdicts)
        if validated_manufacturers:
            card = replace(card, metrics=replace(card.metrics, by_manufacturer={
                m: GroupMetrics(n=5, per_class={}) for m in validated_manufacturers}))
        version = reg.publish(tmp, card)
    if make_current:
        reg.set_current(version.name)
    return version
