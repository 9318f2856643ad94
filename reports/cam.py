"""Class activation maps from a version's own ONNX graph: where in the image the model looked.

No change to training or the served model is needed: the graph is read, the tensor its global
pooling reduces (the last convolutional feature map F, (C, h, w)) is added as a second output of
an in-memory copy, and one forward pass gives both the logits and F. The classifier's weights
are the final linear layer's (the ``Gemm`` that makes the logits): with pooled features
``[max F, mean F]`` (mammoflag's network) or ``[mean F]`` (a ResNet), the weights of each pooled
copy of a channel are summed, so class k's map is ``sum_c w_kc F_c`` — Zhou et al.'s CAM, which is
exact for the average-pooled half and marks the max-pooled half's evidence where it lies.

Maps are drawn over the model's own input (the letterboxed first channel), so their geometry is
the network's: a model looking at a frame edge or a burned-in text label shows there. The fp32
ONNX file is used (INT8 graphs fold the weights into quantised operators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PASS_THROUGH = {"Flatten", "Reshape", "Concat", "Mul", "Sub", "Add", "Div", "Squeeze", "Identity", "Dropout",
                "Cast"}
POOLING = {"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "ReduceMean", "ReduceMax"}


class NoCam(ValueError):
    """The graph has no global-pooling + linear head to read a map from."""


@dataclass(frozen=True)
class CamModel:
    session: Any = field(repr=False)
    input_name: str
    logits_name: str
    features_name: str
    weights: np.ndarray = field(repr=False)  # (K, D) of the final linear layer, D = pooled copies x C


def load_cam_model(onnx_path: Path) -> CamModel:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    outputs = [o.name for o in graph.output]
    head = next((n for n in graph.node if n.op_type == "Gemm" and n.output[0] in outputs), None)
    if head is None:
        raise NoCam("no Gemm makes the model's output")
    w = inits.get(head.input[1])
    if w is None:
        raise NoCam("the final layer's weights are not a constant")
    trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
    weights = w if trans_b else w.T
    pooled_from: set[str] = set()
    todo = [head.input[0]]
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None:
            if name in inits:
                continue
            raise NoCam(f"{name} is a graph input, not pooled features")
        if node.op_type in POOLING:
            pooled_from.add(node.input[0])
        elif node.op_type in PASS_THROUGH or node.op_type == "Constant":
            todo.extend(i for i in node.input if i and i not in inits)
        else:
            raise NoCam(f"{node.op_type} between the pooling and the classifier")
    if len(pooled_from) != 1:
        raise NoCam(f"pooling reads {len(pooled_from)} feature maps, not one")
    features = pooled_from.pop()
    graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return CamModel(session, session.get_inputs()[0].name, head.output[0], features, weights.astype(np.float64))


def class_maps(cam: CamModel, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), maps (N, K, h, w)) from one forward pass over a model-input batch."""
    logits, feats = cam.session.run([cam.logits_name, cam.features_name],
                                    {cam.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
    feats = np.asarray(feats, dtype=np.float64)
    c = feats.shape[1]
    k, d = cam.weights.shape
    if d % c:
        raise NoCam(f"{d} classifier inputs are not copies of {c} feature channels")
    w = cam.weights.reshape(k, d // c, c).sum(axis=1)  # each pooled copy of a channel: one weight
    return np.asarray(logits, dtype=np.float64), np.einsum("kc,nchw->nkhw", w, feats)


def overlay_png(model_input: np.ndarray, cam_map: np.ndarray, path: Path, side: int = 256) -> Path:
    """The model's input (first channel) with the map's positive part over it, as a PNG."""
    from matplotlib import colormaps
    from PIL import Image

    base = Image.fromarray(np.asarray(model_input[0], dtype=np.uint8)).convert("RGB").resize((side, side))
    m = np.clip(cam_map, 0, None)
    m = m / m.max() if m.max() > 0 else m
    heat = Image.fromarray((m * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    rgba = (colormaps["inferno"](np.asarray(heat) / 255.0) * 255).astype(np.uint8)
    alpha = (np.asarray(heat, dtype=np.float64) / 255.0 * 0.6)[..., None]
    out = (np.asarray(base, dtype=np.float64) * (1 - alpha) + rgba[..., :3] * alpha).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(path)
    return path
