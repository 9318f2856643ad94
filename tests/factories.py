"""Small real artefacts for tests that need a model but not a trained one.

``tiny_model_version`` builds a tiny CNN in torch with hand-set weights that respond to
bright pixels (a stand-in for a metal biopsy marker), exports it to ONNX with a dynamic
batch axis and registers it, so the backend and flagger tests run a real ONNX model.
"""

from __future__ import annotations

from pathlib import Path

from typing import Mapping

from mammoflag.card import Verdict, stand_in_card
from mammoflag.registry import FP32_FILE, ModelVersion, Registry
from mammoflag.spec import ModelSpec


def tiny_model_version(registry_root: Path, spec: ModelSpec, make_current: bool = True,
                       bias: float = -2.0, verdicts: Mapping[str, Verdict] | None = None) -> ModelVersion:
    import torch
    from torch import nn

    n = len(spec.classes)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.head = nn.Linear(3, n)

        def forward(self, x):
            return self.head(self.pool(x).flatten(1))

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(bias)
    reg = Registry(registry_root)
    with reg.staging() as tmp:
        dummy = torch.zeros(1, 3, spec.input_size, spec.input_size)
        torch.onnx.export(model, (dummy,), str(tmp / FP32_FILE), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        version = reg.publish(tmp, stand_in_card(spec, "tiny hand-set test model", reg.current_name(),
                                                verdicts=verdicts))
    if make_current:
        reg.set_current(version.name)
    return version
