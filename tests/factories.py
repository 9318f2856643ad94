"""Small real artefacts for tests that need a model but not a trained one.

``tiny_model_version`` builds a tiny CNN in torch with hand-set weights that respond to
bright pixels (a stand-in for a metal biopsy marker), exports it to ONNX with a dynamic
batch axis and registers it, so the backend and flagger tests run a real ONNX model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mammoflag.card import GroupMetrics, Verdict, stand_in_card
from mammoflag.novelty import fit_reference, novelty_path
from mammoflag.registry import FP32_FILE, ModelVersion, Registry
from mammoflag.spec import ModelSpec


def tiny_model_version(registry_root: Path, spec: ModelSpec, make_current: bool = True,
                       bias: float = -2.0, verdicts: Mapping[str, Verdict] | None = None,
                       validated_manufacturers: Sequence[str] = (),
                       novelty_inputs: tuple[np.ndarray, np.ndarray] | None = None) -> ModelVersion:
    """A hand-set model (below); its card states ``verdicts`` and, when given, validation images from
    ``validated_manufacturers`` (five each, no figures). With ``novelty_inputs`` (training and validation
    model inputs) the ONNX file also outputs an embedding (the area plane's mean and spread, the max plane's
    mean) and the version keeps a novelty reference fitted on them, as training does."""
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

    class TinyWithEmbedding(Tiny):
        def forward(self, x):
            area, peak = x[:, 0].flatten(1), x[:, 1].flatten(1)
            embedding = torch.stack([area.mean(1), area.std(1), peak.mean(1)], dim=1)
            return super().forward(x), embedding

    torch.manual_seed(0)
    model = (Tiny() if novelty_inputs is None else TinyWithEmbedding()).eval()
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(bias)
    reg = Registry(registry_root)
    with reg.staging() as tmp:
        dummy = torch.zeros(1, len(CHANNELS), spec.input_size, spec.input_size)
        outputs = ["logits"] if novelty_inputs is None else ["logits", "embedding"]
        torch.onnx.export(model, (dummy,), str(tmp / FP32_FILE), input_names=["image"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ("image", *outputs)}, opset_version=17,
                          dynamo=False)
        if novelty_inputs is not None:
            from training.export import onnx_logits

            train_x, valid_x = novelty_inputs
            fit_reference(FP32_FILE, onnx_logits(tmp / FP32_FILE, train_x, output="embedding"),
                          onnx_logits(tmp / FP32_FILE, valid_x, output="embedding")).save(novelty_path(tmp, FP32_FILE))
        card = stand_in_card(spec, "tiny hand-set test model", reg.current_name(), verdicts=verdicts)
        if validated_manufacturers:
            card = replace(card, metrics=replace(card.metrics, by_manufacturer={
                m: GroupMetrics(n=5, per_class={}) for m in validated_manufacturers}))
        version = reg.publish(tmp, card)
    if make_current:
        reg.set_current(version.name)
    return version
