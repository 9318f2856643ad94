"""ONNX export with a numeric parity check, and static INT8 quantization.

The ONNX file is what serves (ML backend, flagger); the torch model exists only inside a
training run. So before a version is registered its ONNX output is compared with torch on
real validation inputs; any probability further apart than the tolerance refuses the export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mammoflag.inference import EMBEDDING_OUTPUT, LOGITS_OUTPUT, calibrated_probabilities
from mammoflag.spec import ModelSpec

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17
INPUT_NAME = "image"
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Concat"]


class ParityError(RuntimeError):
    """ONNX and torch disagree on real inputs: the version is not registered."""

    def __init__(self, max_difference: float, tolerance: float, model: str):
        super().__init__(f"{model}: ONNX probabilities differ from torch by up to {max_difference:.3g} "
                         f"(tolerance {tolerance:g}); refusing to register this version")
        self.max_difference = max_difference


def served_module(model):
    """``model`` (``nn.Sequential(body, head)``) with a second output: the whole-image embedding.

    The embedding is what the classifier reads of the whole image, pooled (``mammoflag.novelty``): the
    image branch's features of ``training.network`` (the slice before the tiles'), or a ResNet body's
    feature map pooled by mean and max. The logits are the model's own, unchanged.
    """
    import torch
    from torch import nn

    class Served(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.body, self.head = net[0], net[1]
            self.image_features = getattr(self.head, "image_features", None)

        def forward(self, x):
            f = self.body(x)
            logits = self.head(f)
            if f.dim() == 4:  # a ResNet body's feature map
                embedding = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            elif self.image_features is not None:
                embedding = f[:, :self.image_features]
            else:
                embedding = f
            return logits, embedding

    return Served(model)


def export_onnx(model, path: Path, input_size: int) -> Path:
    """Write ``model`` (eval mode, NCHW float32 in -> logits out) as ONNX with a dynamic batch axis, and the
    whole-image embedding as its second output (``served_module``)."""
    import torch

    from mammoflag.preprocess import CHANNELS

    model = model.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(2, len(CHANNELS), input_size, input_size)
    outputs = [LOGITS_OUTPUT, EMBEDDING_OUTPUT]
    with torch.no_grad():
        torch.onnx.export(served_module(model).eval(), (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *outputs)},
                          opset_version=ONNX_OPSET, dynamo=False)
    return path


def onnx_logits(path: Path, inputs: np.ndarray, batch_size: int = 64, output: str = LOGITS_OUTPUT) -> np.ndarray:
    """An ONNX file's ``output`` (the logits, or ``embedding``) on model inputs, in batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [session.run([output], {name: np.ascontiguousarray(inputs[i:i + batch_size], dtype=np.float32)})[0]
           for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def torch_logits(model, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch

    model = model.eval()
    with torch.no_grad():
        # model inputs are uint8 (mammoflag.preprocess); the network takes them as float 0..255
        out = [model(torch.from_numpy(np.asarray(inputs[i:i + batch_size], dtype=np.float32))).float().numpy()
               for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out)


def check_parity(onnx_path: Path, model, inputs: np.ndarray, spec: ModelSpec,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |p_onnx - p_torch| over real inputs and classes (calibrated probabilities); ParityError above tolerance."""
    if len(inputs) == 0:
        raise ValueError("parity check needs at least one real input")
    diff = float(np.max(np.abs(calibrated_probabilities(onnx_logits(onnx_path, inputs), spec)
                               - calibrated_probabilities(torch_logits(model, inputs), spec))))
    if not np.isfinite(diff) or diff > tolerance:
        raise ParityError(diff if np.isfinite(diff) else float("inf"), tolerance, onnx_path.name)
    log.info("ONNX parity on %d inputs: max probability difference %.2g", len(inputs), diff)
    return diff


class _Batches:
    """onnxruntime CalibrationDataReader over model inputs (training images)."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 16):
        self._it = iter([{INPUT_NAME: np.ascontiguousarray(inputs[i:i + batch_size], dtype=np.float32)}
                         for i in range(0, len(inputs), batch_size)])

    def get_next(self):
        return next(self._it, None)


@dataclass(frozen=True)
class Int8Outcome:
    kept: bool
    reason: str
    fp32_mean_auroc: float | None
    int8_mean_auroc: float | None
    max_auroc_drop: float | None


def quantize_static_int8(fp32_path: Path, int8_path: Path, calibration_inputs: np.ndarray) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights) calibrated on training images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_name(int8_path.stem + ".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(str(prepared), str(int8_path), _Batches(calibration_inputs),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        # the head's BatchNorm1d stays float: per-channel int8 has no axis 1 on its rank-1 scale
                        op_types_to_quantize=QUANTIZED_OPS)
    finally:
        prepared.unlink(missing_ok=True)
    return int8_path


def try_int8(fp32_path: Path, int8_path: Path, calibration_inputs: np.ndarray, valid_inputs: np.ndarray,
             valid_targets: np.ndarray, max_drop: float = 0.005) -> Int8Outcome:
    """Quantize and keep the INT8 model only when no class loses more than ``max_drop`` validation AUROC."""
    from training.calibrate import auroc, mean_auroc

    try:
        quantize_static_int8(fp32_path, int8_path, calibration_inputs)
    except Exception as exc:  # quantization is an optimisation: the fp32 model still serves
        int8_path.unlink(missing_ok=True)
        return Int8Outcome(False, f"quantization failed: {type(exc).__name__}: {exc}", None, None, None)
    fp32 = 1 / (1 + np.exp(-onnx_logits(fp32_path, valid_inputs).astype(np.float64)))
    int8 = 1 / (1 + np.exp(-onnx_logits(int8_path, valid_inputs).astype(np.float64)))
    drops = []
    for k in range(valid_targets.shape[1]):
        a32, a8 = auroc(fp32[:, k], valid_targets[:, k]), auroc(int8[:, k], valid_targets[:, k])
        if a32 is not None and a8 is not None:
            drops.append(a32 - a8)
    m32, m8 = mean_auroc(fp32, valid_targets), mean_auroc(int8, valid_targets)
    if not drops:
        int8_path.unlink(missing_ok=True)
        return Int8Outcome(False, "validation has no class with both positives and negatives: cannot check INT8",
                           m32, m8, None)
    worst = float(max(drops))
    if worst > max_drop:
        int8_path.unlink(missing_ok=True)
        return Int8Outcome(False, f"INT8 loses {worst:.4f} validation AUROC (> {max_drop}); fp32 serves",
                           m32, m8, worst)
    return Int8Outcome(True, f"INT8 within {max_drop} validation AUROC of fp32 (worst class drop {worst:.4f})",
                       m32, m8, worst)


def displays_to_inputs(displays: Sequence[np.ndarray], size: int) -> np.ndarray:
    from mammoflag.preprocess import model_input_batch

    return model_input_batch(list(displays), size)
