"""Small real artefacts for tests that need a model but not a trained one.

``tiny_model_version`` builds a tiny CNN in torch with hand-set weights that respond to
bright pixels (a stand-in for a metal biopsy marker), exports it to ONNX with a dynamic
batch axis and registers it, so the backend and flagger tests run a real ONNX model.
"""

from __future__ import annotations

import time
from pathlib import Path

from mammoflag.registry import FP32_FILE, ModelVersion, Registry
from mammoflag.spec import ModelSpec


def tiny_model_version(registry_root: Path, spec: ModelSpec, make_current: bool = True,
                       bias: float = -2.0) -> ModelVersion:
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
        card = {
            "spec": spec.to_json(),
            "metrics": {},
            "label_count": 0,
            "data_fingerprint": "tiny-test-model",
            "parent_version": reg.current_name(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "int8": {"kept": False, "reason": "test model"},
        }
        version = reg.publish(tmp, card)
    if make_current:
        reg.set_current(version.name)
    return version
