"""ONNX inference shared by the ML backend and the flagger.

Load a :class:`OnnxClassifier` once (at start-up), then call it per batch. It returns
calibrated per-class probabilities: ``sigmoid(logit / temperature + header offset)``, the offset being
the version's header weights times the image's header evidence (``mammoflag.header_evidence``; 0 for
an image whose header says nothing, and for versions fitted without headers), and, where the version
kept a novelty reference for the file it serves, each image's novelty (``mammoflag.novelty``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from mammoflag.header_evidence import select_features, weight_matrix
from mammoflag.novelty import NoveltyReference, novelty_path
from mammoflag.preprocess import model_input_batch
from mammoflag.registry import ModelVersion
from mammoflag.spec import ModelSpec

log = logging.getLogger(__name__)

# the served ONNX models' outputs (training/export.py writes them): logits, then the whole-image embedding
# (versions exported before novelty have the first only)
LOGITS_OUTPUT = "logits"
EMBEDDING_OUTPUT = "embedding"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fused_logits(logits: np.ndarray, temperatures: np.ndarray, header_weights: np.ndarray | None = None,
                 header: np.ndarray | None = None) -> np.ndarray:
    """The one calibration rule, on arrays: ``logit / T`` (per class) plus ``header @ header_weights.T`` when both
    are given (``header_weights`` (C, F), ``header`` (N, F) in the same feature order). float64 throughout:
    thresholds were fitted on float64."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(temperatures, dtype=np.float64)
    if header is None or header_weights is None or len(z) == 0:
        return z
    return z + np.asarray(header, dtype=np.float64) @ np.asarray(header_weights, dtype=np.float64).T


def calibrated_logits(logits: np.ndarray, spec: ModelSpec, header: np.ndarray | None = None) -> np.ndarray:
    """``logit / T`` plus, when the version has header weights and ``header`` (``header_matrix`` rows) is given,
    the header's offset."""
    t = np.array([spec.temperatures.get(c, 1.0) for c in spec.classes], dtype=np.float64)
    if header is None or not spec.header_weights:
        return fused_logits(logits, t)
    w = weight_matrix(spec.header_weights, spec.classes, len(spec.header_features))
    return fused_logits(logits, t, w, select_features(header, spec.header_features))


def calibrated_probabilities(logits: np.ndarray, spec: ModelSpec, header: np.ndarray | None = None) -> np.ndarray:
    return sigmoid(calibrated_logits(logits, spec, header))


def flags_from_probabilities(probs: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Boolean (N, C): each class at or above its calibrated threshold."""
    th = np.array([spec.thresholds.get(c, 0.5) for c in spec.classes])
    return np.asarray(probs) >= th


def uncertainty_score(probs: np.ndarray) -> np.ndarray:
    """Confidence in [0, 1], lower = less certain: 1 - the largest binary entropy (in bits) over classes."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return 1.0 - h.max(axis=-1)


def choices_for(probs_row: Sequence[float], spec: ModelSpec) -> list[str]:
    chosen = [c for c, p in zip(spec.classes, probs_row) if p >= spec.thresholds.get(c, 0.5)]
    return chosen or [spec.negative]


class OnnxClassifier:
    """An ONNX Runtime session plus the spec of the model it runs."""

    def __init__(self, version: ModelVersion, prefer_int8: bool = True, threads: int | None = None,
                 spin: bool = True):
        """``spin=False``: idle ORT threads sleep instead of busy-waiting, leaving the cores to
        other processes of the same job (the flagger's decode processes)."""
        import onnxruntime as ort

        self.version = version
        self.spec: ModelSpec = version.spec
        path: Path = version.model_file(prefer_int8)
        self.model_path = path
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.novelty_reference = load_novelty_reference(version, path, [o.name for o in self.session.get_outputs()])
        # novelty's nearest-image product runs on one BLAS thread: ONNX Runtime's threads (and the flagger's
        # decode processes) already have the cores, and OpenBLAS's own threads would spin beside them after every
        # call (benchmarks/results/flagger-novelty.json has the runs)
        self._blas = ThreadpoolController()
        log.info("loaded model %s (%s)", self.name, path.name)

    @property
    def name(self) -> str:
        return self.version.name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float32)
        return self.session.run([LOGITS_OUTPUT], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def probabilities(self, batch: np.ndarray, header: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities of a model-input batch; ``header``: its ``header_matrix`` (None: image only)."""
        return calibrated_probabilities(self.logits(batch), self.spec, header)

    def scores(self, batch: np.ndarray, header: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities and, when the version has a novelty reference, each image's novelty
        (one forward pass for both); (probabilities, None) otherwise."""
        if self.novelty_reference is None:
            return self.probabilities(batch, header), None
        if len(batch) == 0:
            return self.probabilities(batch, header), np.zeros(0)
        logits, embedding = self.session.run([LOGITS_OUTPUT, EMBEDDING_OUTPUT],
                                             {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        with self._blas.limit(limits=1, user_api="blas"):
            novelty = self.novelty_reference.novelty(embedding)
        return calibrated_probabilities(logits, self.spec, header), novelty

    def probabilities_for_displays(self, displays: Sequence[np.ndarray], header: np.ndarray | None = None) -> np.ndarray:
        return self.probabilities(model_input_batch(displays, self.spec.input_size), header)


def load_novelty_reference(version: ModelVersion, model_path: Path, outputs: Sequence[str]) -> NoveltyReference | None:
    """The novelty reference kept for this served file, or None (a version trained before novelty, a file
    without the embedding output, or a reference that cannot be read: novelty is then left out, said once)."""
    path = novelty_path(version.path, model_path.name)
    if EMBEDDING_OUTPUT not in outputs or not path.exists():
        log.info("model %s (%s) has no novelty reference: images get no novelty", version.name, model_path.name)
        return None
    try:
        reference = NoveltyReference.load(path)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("model %s: novelty reference %s unreadable (%s): images get no novelty",
                    version.name, path.name, type(exc).__name__)
        return None
    if reference.model_file != model_path.name:
        log.warning("model %s: novelty reference %s was made for %s, not %s: images get no novelty",
                    version.name, path.name, reference.model_file, model_path.name)
        return None
    return reference


def as_prob_dict(probs_row: Sequence[float], spec: ModelSpec) -> Mapping[str, float]:
    return {c: float(p) for c, p in zip(spec.classes, probs_row)}
