"""Class activation maps from a version's own ONNX graph: where in the image the model looked.

No change to training or the served model is needed: the graph is read, and one forward pass of an
in-memory copy with extra outputs gives the logits and what the maps are made of.

- **The whole-image branch** (every network): the tensor its global pooling reduces (the last
  convolutional feature map F, (C, h, w)) is added as an output. The classifier's weights are those
  of the ``Gemm`` that makes the image logits: with pooled features ``[max F, mean F]`` (mammoflag's
  networks) or ``[mean F]`` (a ResNet), the weights of each pooled copy of a channel are summed, so
  class k's map is ``sum_c w_kc F_c`` — Zhou et al.'s CAM, exact for the average-pooled half (its
  mean over the map is that half's logit) and marking the max-pooled half's evidence where it lies.
- **The tiles** (``markerpatch``: logits = Gemm(image features) + log-sum-exp over tiles of
  Linear(tile features)): the output of the tile classifier (a ``MatMul`` with constant weights
  under the final ``Add``, plus its bias), i.e. each tile's own logit per class, is added as an
  output too. A tile is a ``PATCH`` x ``PATCH`` display crop around a candidate spot
  (``mammoflag.preprocess.candidates``, tile n = the n-th strongest), so its place is recomputed
  from the display image and mapped into the letterboxed input (``preprocess.letterbox_coords``).
  The map is then, at model-input resolution, the image CAM (upsampled) plus, where a tile lies,
  that tile's logit (the strongest tile where tiles overlap): both are logits, so one scale.

Both parts are found by the graph's structure (the op types and constant weights between the
output and the pooling), never by node names. Maps are drawn over the model's own input (the
letterboxed first channel), so their geometry is the network's: a model looking at a frame edge or
a burned-in text label shows there. The fp32 ONNX file is used (INT8 graphs fold the weights into
quantised operators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PASS_THROUGH = {"Flatten", "Reshape", "Concat", "Mul", "Sub", "Add", "Div", "Squeeze", "Identity", "Dropout",
                "Cast"}
POOLING = {"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "ReduceMean", "ReduceMax"}
MAX_TILE_SEARCH = 64  # nodes walked back from the final Add to the tile classifier


class NoCam(ValueError):
    """The graph has no global-pooling + linear head to read a map from."""


@dataclass(frozen=True)
class CamModel:
    session: Any = field(repr=False)
    input_name: str
    logits_name: str
    features_name: str
    weights: np.ndarray = field(repr=False)  # (K, D) of the image classifier, D = pooled copies x C
    tile_logits_name: str | None = None  # (N, tiles, K): each tile's own logit (markerpatch), else None


class _Graph:
    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # shapes only resolve slices of concatenations; without them those raise NoCam
            inferred = self.graph
        self.dims: dict[str, tuple[int | None, ...]] = {}
        for vi in (*inferred.value_info, *inferred.output, *inferred.input):
            shape = vi.type.tensor_type.shape
            self.dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            from onnx import numpy_helper

            value = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value.t) if value is not None else None
        return None

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None


def _sliced_concat_input(g: _Graph, node) -> str:
    """The one Concat input a Slice of a Concat selects exactly (the image features out of [image, tiles])."""
    data, starts, ends = node.input[0], g.const(node.input[1]), g.const(node.input[2])
    axes = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.array([0])
    steps = g.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.array([1])
    concat = g.producer.get(data)
    if starts is None or ends is None or axes is None or steps is None or len(starts) != 1 \
            or concat is None or concat.op_type != "Concat" or int(steps[0]) != 1:
        raise NoCam("a Slice between the pooling and the classifier that is not one part of a concatenation")
    axis = next(a.i for a in concat.attribute if a.name == "axis")
    if int(axes[0]) != axis:
        raise NoCam("a Slice across a concatenation's other axis")
    start, end, offset = int(starts[0]), int(ends[0]), 0
    for name in concat.input:
        dims = g.dims.get(name)
        size = dims[axis] if dims and len(dims) > axis else None
        if size is None:
            break
        if (offset, offset + size) == (start, end):
            return name
        offset += size
        if offset > start:
            break
    raise NoCam("a Slice that is not exactly one part of a concatenation")


def _image_head(g: _Graph, head) -> tuple[np.ndarray, str]:
    """(weights (K, D), the feature map the image classifier's pooled input is pooled from)."""
    w = g.inits.get(head.input[1])
    if w is None:
        raise NoCam("the final layer's weights are not a constant")
    trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
    weights = w if trans_b else w.T
    pooled_from: set[str] = set()
    todo = [head.input[0]]
    while todo:
        name = todo.pop()
        node = g.producer.get(name)
        if node is None:
            if name in g.inits:
                continue
            raise NoCam(f"{name} is a graph input, not pooled features")
        if node.op_type in POOLING:
            pooled_from.add(node.input[0])
        elif node.op_type == "Slice":
            todo.append(_sliced_concat_input(g, node))
        elif node.op_type in PASS_THROUGH or node.op_type == "Constant":
            todo.extend(i for i in node.input if i and not g.is_const(i))
        else:
            raise NoCam(f"{node.op_type} between the pooling and the classifier")
    if len(pooled_from) != 1:
        raise NoCam(f"pooling reads {len(pooled_from)} feature maps, not one")
    return weights, pooled_from.pop()


def _tile_logits(g: _Graph, start: str, classes: int) -> str:
    """The tile classifier's output under the final Add: a MatMul by a constant (D, K), plus its bias."""
    seen: set[str] = set()
    todo = [start]
    while todo and len(seen) < MAX_TILE_SEARCH:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            continue
        if node.op_type == "MatMul":
            w = g.const(node.input[1])
            if w is not None and w.ndim == 2 and w.shape[1] == classes:
                out = node.output[0]
                bias = next((c for c in g.consumers.get(out, []) if c.op_type == "Add"
                             and any(g.is_const(i) for i in c.input if i != out)), None)
                return bias.output[0] if bias is not None else out
        todo.extend(i for i in node.input if i and not g.is_const(i))
    raise NoCam("the final Add has no tile classifier (a MatMul by constant weights) under it")


def load_cam_model(onnx_path: Path) -> CamModel:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    g = _Graph(model)
    graph = model.graph
    logits = graph.output[0].name
    final = g.producer.get(logits)
    other: str | None = None  # the final Add's other operand: the pooled tile logits
    if final is not None and final.op_type == "Gemm":
        head = final
    elif final is not None and final.op_type == "Add":
        gemms = [(i, g.producer[i]) for i in final.input if i in g.producer and g.producer[i].op_type == "Gemm"]
        if len(gemms) != 1:
            raise NoCam("the final Add does not add one Gemm's logits to something else")
        image_logits, head = gemms[0]
        other = next(i for i in final.input if i != image_logits)
    else:
        raise NoCam("no Gemm makes the model's output")
    weights, features = _image_head(g, head)
    tile_name = _tile_logits(g, other, weights.shape[0]) if other is not None else None
    graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    if tile_name is not None:
        graph.output.append(onnx.helper.make_tensor_value_info(tile_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return CamModel(session, session.get_inputs()[0].name, logits, features, weights.astype(np.float64), tile_name)


@dataclass(frozen=True)
class CamOutputs:
    logits: np.ndarray  # (N, K), as served
    image_maps: np.ndarray  # (N, K, h, w): the whole-image branch's CAM on its feature grid
    tile_logits: np.ndarray | None  # (N, tiles, K): each tile's own logit; None without a tile branch


def forward(cam: CamModel, batch: np.ndarray) -> CamOutputs:
    """Logits, image-branch maps and (markerpatch) each tile's logit from one forward pass."""
    names = [cam.logits_name, cam.features_name] + ([cam.tile_logits_name] if cam.tile_logits_name else [])
    out = cam.session.run(names, {cam.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
    feats = np.asarray(out[1], dtype=np.float64)
    c = feats.shape[1]
    k, d = cam.weights.shape
    if d % c:
        raise NoCam(f"{d} classifier inputs are not copies of {c} feature channels")
    w = cam.weights.reshape(k, d // c, c).sum(axis=1)  # each pooled copy of a channel: one weight
    tiles = np.asarray(out[2], dtype=np.float64) if cam.tile_logits_name else None
    if tiles is not None and (tiles.ndim != 3 or tiles.shape[2] != k):
        raise NoCam(f"the tile classifier's output has shape {tiles.shape}, not (images, tiles, {k})")
    return CamOutputs(np.asarray(out[0], dtype=np.float64), np.einsum("kc,nchw->nkhw", w, feats), tiles)


def tile_boxes(display: np.ndarray, tiles: int, size: int) -> np.ndarray:
    """(n <= tiles, 4) letterboxed (top, left, bottom, right) of each tile's display crop, in tile order."""
    from mammoflag.preprocess import PATCH, candidates, letterbox_coords, tophat

    centres = candidates(tophat(np.ascontiguousarray(display)), tiles)
    half = PATCH // 2
    lo = letterbox_coords(centres - half, display.shape, size)  # the crop's display box, as preprocess cuts it
    hi = letterbox_coords(centres - half + PATCH, display.shape, size)
    return np.concatenate([lo, hi], axis=1)


def compose(image_map: np.ndarray, tile_logits: np.ndarray | None, boxes: np.ndarray | None, size: int) -> np.ndarray:
    """One class's map at model-input resolution: the image CAM upsampled, plus each tile's logit where it lies."""
    import cv2

    out = cv2.resize(np.asarray(image_map, dtype=np.float32), (size, size), interpolation=cv2.INTER_LINEAR) \
        .astype(np.float64)
    if tile_logits is None or boxes is None or not len(boxes):
        return out
    layer = np.full((size, size), -np.inf)
    for z, (top, left, bottom, right) in zip(tile_logits, boxes):
        # the model pixels whose centres lie in the tile's box (at least one)
        r0 = int(np.clip(np.ceil(top - 0.5), 0, size - 1))
        c0 = int(np.clip(np.ceil(left - 0.5), 0, size - 1))
        r1 = int(np.clip(max(r0 + 1, np.ceil(bottom - 0.5)), 1, size))
        c1 = int(np.clip(max(c0 + 1, np.ceil(right - 0.5)), 1, size))
        layer[r0:r1, c0:c1] = np.maximum(layer[r0:r1, c0:c1], float(z))
    return out + np.where(np.isfinite(layer), layer, 0.0)


def class_maps(cam: CamModel, batch: np.ndarray, displays: Sequence[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), maps (N, K, h, w)) from one forward pass over a model-input batch.

    Without a tile branch the maps are the image CAM on its feature grid. With one, ``displays`` (the
    images ``batch`` was made from) place the tiles, and the maps are at model-input resolution."""
    out = forward(cam, batch)
    if out.tile_logits is None:
        return out.logits, out.image_maps
    if displays is None or len(displays) != len(batch):
        raise ValueError("a model with tiles needs the display images the batch was made from, to place them")
    size = int(batch.shape[-1])
    n, k = out.logits.shape
    maps = np.zeros((n, k, size, size))
    for i, display in enumerate(displays):
        boxes = tile_boxes(display, out.tile_logits.shape[1], size)
        for j in range(k):
            maps[i, j] = compose(out.image_maps[i, j], out.tile_logits[i, :len(boxes), j], boxes, size)
    return out.logits, maps


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
