"""Train one model version: fastai ResNet18 -> calibrate -> ONNX (+INT8) -> registry.

The pure core is :func:`train_version`. It takes a :class:`~training.dataset.LabelledSet`, the
model spec, a registry and a :class:`TrainConfig`; it returns a :class:`TrainResult`. The CLI
and the Celery task only build those arguments.

Inputs are made by :func:`mammoflag.preprocess.model_input` — the very function the ML backend
and the flagger call — so training and serving see the same pixels (letterboxed grey display
image replicated to three channels, ImageNet-normalised).

Three ways to fit, each a ``TrainConfig.mode``, trading accuracy for time on a small CPU:

- ``fine_tune``: fastai's ``fine_tune``: frozen-body epochs, then the whole network.
- ``frozen``: frozen-body epochs only (the body runs forward every batch; only the head and
  the batch-norm layers learn).
- ``head_only``: the body runs once over all images and its features are cached; the head is
  refitted on the cache. With a parent version's weights this is the quick refit between full
  fine-tunes; it costs one forward pass per image instead of several forward+backward passes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from mammoflag.inference import calibrated_probabilities
from mammoflag.preprocess import load_display_image, model_input
from mammoflag.registry import FP32_FILE, INT8_FILE, ModelVersion, Registry
from mammoflag.card import ModelCard, TrustRule
from mammoflag.spec import ModelSpec
from training.calibrate import calibrate, metrics_by, out_of_fold_metrics, save_plots, validation_metrics
from training.dataset import LabelledImage, LabelledSet, LeftOut
from training.export import Int8Outcome, check_parity, export_onnx, onnx_logits, try_int8
from training.modelcard import build_card
from training.promotion import decide_promotion
from training.trust import assess

log = logging.getLogger(__name__)

TORCH_WEIGHTS_FILE = "model.pt"  # torch state dict kept beside the ONNX file: parent of head-only refits
Mode = Literal["fine_tune", "frozen", "head_only", "auto"]


class NotEnoughLabels(ValueError):
    """Too few usable labelled images (or none on one side of the split) to train and validate."""


@dataclass(frozen=True)
class TrainConfig:
    mode: Mode = "fine_tune"  # auto: head_only while labels grew < refit_growth x since the last full fine-tune
    refit_growth: float = 1.5
    epochs: int = 3  # whole-network epochs after the frozen ones (fine_tune)
    frozen_epochs: int = 1  # frozen-body epochs (fine_tune, frozen)
    head_epochs: int = 8  # head epochs on cached features (head_only)
    batch_size: int = 32
    lr: float | None = None  # None: lr_find picks it (fastai's 'valley' suggestion)
    lr_find_iterations: int = 20  # fastai default 100; 20 finds the valley within 2x and costs a fifth
    lr_floor: float = 1e-3  # lr_find's valley on a random-init body lands at 1e-4..6e-4, which underfits
    reuse_parent_lr: bool = True  # a fine-tune after a fine-tune takes the parent's lr and skips lr_find
    channels_last: bool = True
    augment_flips: bool = True  # random horizontal/vertical flips: markers and views appear either side
    input_size: int | None = None  # None: the spec's
    valid_fraction: float = 0.2
    min_train: int = 8
    target_sensitivity: float = 0.95
    quantize_int8: bool = True
    int8_max_auroc_drop: float = 0.005
    not_worse_epsilon: float = 0.005  # new mean AUROC >= current's - epsilon, on the same validation images
    parity_tolerance: float = 1e-4
    pretrained_weights: Path | None = None  # ImageNet ResNet18 state dict; else the torch hub cache; else random
    threads: int | None = None
    seed: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> "TrainConfig":
        """Training knobs from ``MAMMOFLAG_TRAIN_*`` (mode, epochs, frozen_epochs, head_epochs, batch_size,
        lr, quantize_int8, threads); anything not set keeps its default."""
        names = {"mode": str, "epochs": int, "frozen_epochs": int, "head_epochs": int, "batch_size": int,
                 "lr": float, "quantize_int8": lambda s: s.lower() in ("1", "true", "yes"), "threads": int,
                 "lr_find_iterations": int}
        values: dict[str, Any] = {}
        for name, parse in names.items():
            raw = env.get(f"MAMMOFLAG_TRAIN_{name.upper()}")
            if raw:
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ValueError(f"MAMMOFLAG_TRAIN_{name.upper()}={raw!r}: {exc}") from exc
        config = cls(**{**values, **overrides})
        if config.mode not in ("fine_tune", "frozen", "head_only", "auto"):
            raise ValueError(f"MAMMOFLAG_TRAIN_MODE must be fine_tune, frozen, head_only or auto, not {config.mode!r}")
        return config


@dataclass(frozen=True)
class TrainResult:
    version: ModelVersion
    became_current: bool
    promotion_reason: str
    left_out: tuple[LeftOut, ...]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def card(self) -> ModelCard:
        return self.version.card


# -- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    x: np.ndarray  # (N, 3, S, S) float32 from mammoflag.preprocess.model_input
    y: np.ndarray  # (N, C) float32 0/1
    items: tuple[LabelledImage, ...]


def load_inputs(items: Sequence[LabelledImage], size: int, n_classes: int) -> tuple[Inputs, list[LeftOut]]:
    """Model inputs for the items; an unreadable image is left out with a reason, the rest go on."""
    xs, ys, kept, left_out = [], [], [], []
    for item in items:
        try:
            xs.append(model_input(load_display_image(item.image), size))
        except Exception as exc:  # a corrupt or truncated PNG must not stop the run
            left_out.append(LeftOut(item.task_id, item.key, f"task {item.task_id}: image unreadable "
                                                            f"({type(exc).__name__})"))
            continue
        ys.append(item.target)
        kept.append(item)
    x = np.stack(xs) if xs else np.zeros((0, 3, size, size), np.float32)
    y = np.asarray(ys, dtype=np.float32).reshape(-1, n_classes)
    return Inputs(x, y, tuple(kept)), left_out


# -- weights -------------------------------------------------------------------------------------

def imagenet_weights_file(configured: Path | None) -> Path | None:
    """The local ImageNet ResNet18 weights: the configured file, else torchvision's file in the torch hub cache."""
    if configured is not None:
        if Path(configured).is_file():
            return Path(configured)
        log.warning("configured pretrained weights file %s does not exist", Path(configured).name)
    import torch
    from torchvision.models import ResNet18_Weights

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    return cached if cached.is_file() else None


def load_imagenet_body(body, weights_file: Path) -> None:
    """Copy torchvision ResNet18 weights into fastai's body (the ResNet minus its pool and fc)."""
    import torch
    from torch import nn
    from torchvision.models import resnet18

    reference = resnet18()
    reference.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    body.load_state_dict(nn.Sequential(*list(reference.children())[:-2]).state_dict())


# -- fastai plumbing -----------------------------------------------------------------------------

def _callbacks(config: TrainConfig):
    import torch
    from fastai.callback.core import Callback

    class FlipAugment(Callback):
        """Random horizontal and vertical flips of each training batch (a marker may sit anywhere)."""

        def before_batch(self):
            if not self.training:
                return
            x = self.learn.xb[0]
            h = torch.rand(x.shape[0], device=x.device) < 0.5
            v = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(h[:, None, None, None], x.flip(3), x)
            x = torch.where(v[:, None, None, None], x.flip(2), x)
            self.learn.xb = (x,)

    class ChannelsLastCPU(Callback):
        """channels_last model and inputs (no mixed precision: it does not help on CPU)."""

        order = -1

        def before_fit(self):
            self.learn.model.to(memory_format=torch.channels_last)

        def before_batch(self):
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
                                  for x in self.learn.xb)

    cbs = []
    if config.augment_flips:
        cbs.append(FlipAugment())
    if config.channels_last:
        cbs.append(ChannelsLastCPU())
    return cbs


def _dataloaders(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray, batch_size: int, seed: int):
    import torch
    from fastai.data.core import DataLoaders

    train = list(zip(torch.from_numpy(x), torch.from_numpy(y)))
    valid = list(zip(torch.from_numpy(vx), torch.from_numpy(vy)))
    bs = max(2, min(batch_size, len(train)))
    # drop_last: a final batch of one image would break batch norm
    return DataLoaders.from_dsets(train, valid, bs=bs, shuffle=True, drop_last=len(train) > bs, device="cpu",
                                  num_workers=0, seed=seed)


def _quiet(learn) -> None:
    from fastai.callback.progress import ProgressCallback

    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
    learn.logger = lambda row: log.info("epoch %s", row)


def _find_lr(learn, config: TrainConfig) -> float:
    if config.lr is not None:
        return config.lr
    suggestion = learn.lr_find(num_it=config.lr_find_iterations, show_plot=False)
    lr = float(suggestion.valley)
    if not math.isfinite(lr) or lr <= 0:
        lr = 2e-3
    # measured (benchmarks/results/training.json): the valley is too cautious on a random body, and on
    # tiny sets it can land where the loss is still falling steeply; keep it within a sane band
    return float(min(max(lr, config.lr_floor), 1e-2))


def build_learner(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray, n_classes: int,
                  config: TrainConfig):
    import fastai.callback.schedule  # noqa: F401  (patches Learner with lr_find, fit_one_cycle, fine_tune)
    from fastai.losses import BCEWithLogitsLossFlat
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18

    dls = _dataloaders(x, y, vx, vy, config.batch_size, config.seed)
    # normalize=False: mammoflag.preprocess.model_input already applied the ImageNet statistics
    learn = vision_learner(dls, resnet18, normalize=False, pretrained=False, n_out=n_classes,
                           loss_func=BCEWithLogitsLossFlat(), cbs=_callbacks(config))
    _quiet(learn)
    return learn


def fit_head_on_cached_features(learn, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray,
                                config: TrainConfig) -> dict[str, float]:
    """Run the body once over every image, then fit only the head on the cached features."""
    import torch
    from fastai.learner import Learner
    from fastai.losses import BCEWithLogitsLossFlat

    body, head = learn.model[0], learn.model[1]
    body.eval()
    if config.channels_last:
        body.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    with torch.no_grad():
        def features(arr: np.ndarray) -> np.ndarray:
            out = []
            for i in range(0, len(arr), 64):
                xb = torch.from_numpy(arr[i:i + 64])
                if config.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                out.append(body(xb).contiguous().numpy())
            return np.concatenate(out)

        fx, fvx = features(x), features(vx)
    t_features = time.perf_counter() - t0
    dls = _dataloaders(fx, y, fvx, vy, config.batch_size, config.seed)
    head_learn = Learner(dls, head, loss_func=BCEWithLogitsLossFlat())
    _quiet(head_learn)
    lr = config.lr if config.lr is not None else _find_lr(head_learn, replace(config, lr=None))
    head_learn.fit_one_cycle(config.head_epochs, lr)
    return {"feature_cache_s": t_features, "lr": lr}


def fit(learn, x, y, vx, vy, config: TrainConfig, pretrained: bool) -> dict[str, Any]:
    """Fit the learner in the configured mode; returns what was done (for the model card)."""
    if config.mode == "head_only":
        return {"mode": "head_only", **fit_head_on_cached_features(learn, x, y, vx, vy, config)}
    learn.freeze()  # lr_find and the first epochs on the head (the body is random or ImageNet)
    lr = _find_lr(learn, config)
    if config.mode == "frozen":
        learn.fit_one_cycle(config.frozen_epochs, lr)
        return {"mode": "frozen", "lr": lr, "frozen_epochs": config.frozen_epochs}
    # discriminative learning rates protect ImageNet features; a random body must learn at full rate
    learn.fine_tune(config.epochs, base_lr=lr, freeze_epochs=config.frozen_epochs, lr_mult=100 if pretrained else 1)
    return {"mode": "fine_tune", "lr": lr, "frozen_epochs": config.frozen_epochs, "epochs": config.epochs}


# -- the core ------------------------------------------------------------------------------------

def train_version(labelled: LabelledSet, spec: ModelSpec, registry: Registry, config: TrainConfig,
                  source: Mapping[str, Any] | None = None) -> TrainResult:
    """Train, calibrate, export, check and register one version; move ``current`` only if not worse."""
    import torch
    from fastai.torch_core import set_seed

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    size = config.input_size or spec.input_size
    spec = replace(spec, input_size=size)
    classes = tuple(spec.classes)
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed, reproducible=True)

    train_items, valid_items = labelled.split(config.valid_fraction)
    train, left_train = load_inputs(train_items, size, len(classes))
    valid, left_valid = load_inputs(valid_items, size, len(classes))
    left_out = (*labelled.left_out, *left_train, *left_valid)
    if len(train.y) < config.min_train or len(valid.y) == 0:
        raise NotEnoughLabels(f"{labelled.source}: {len(train.y)} training and {len(valid.y)} validation images "
                              f"usable; need at least {config.min_train} and 1 (left out: {len(left_out)}, "
                              f"unlabelled: {labelled.unlabelled})")
    timings["load_s"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    learn = build_learner(train.x, train.y, valid.x, valid.y, len(classes), config)
    parent = registry.current()
    config = replace(config, mode=resolve_mode(config, parent, spec, len(train.y) + len(valid.y)))
    lr_source = "config" if config.lr is not None else "lr_find"
    if config.lr is None and config.reuse_parent_lr and config.mode == "fine_tune" and parent is not None \
            and parent.card.training.mode == "fine_tune" and parent.card.training.lr:
        config, lr_source = replace(config, lr=float(parent.card.training.lr)), f"parent:{parent.name}"
    body_from = _initialise(learn, config, parent, spec)
    fit_info = fit(learn, train.x, train.y, valid.x, valid.y, config, pretrained=body_from != "random-init")
    fit_info["lr_source"] = lr_source
    timings["fit_s"] = time.perf_counter() - t0

    model = learn.model.eval().to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    from training.export import torch_logits

    valid_logits = torch_logits(model, valid.x)
    cal = calibrate(valid_logits, valid.y, classes, config.target_sensitivity)
    spec = spec.with_calibration(cal.temperatures, cal.thresholds)
    valid_probs = calibrated_probabilities(valid_logits, spec)
    groups = [i.group for i in valid.items]
    metrics = validation_metrics(
        valid_probs, valid.y, classes, cal.thresholds,
        by_manufacturer=metrics_by(valid_probs, valid.y, [i.manufacturer for i in valid.items], classes,
                                   cal.thresholds),
        out_of_fold=out_of_fold_metrics(valid_logits, valid.y, groups, classes, config.target_sensitivity))
    timings["calibrate_s"] = time.perf_counter() - t0

    with registry.staging() as staging:
        t0 = time.perf_counter()
        fp32 = export_onnx(model, staging / FP32_FILE, size)
        parity_inputs = np.concatenate([valid.x[:48], train.x[:16]])
        max_diff = check_parity(fp32, model, parity_inputs, spec, config.parity_tolerance)
        torch.save(model.state_dict(), staging / TORCH_WEIGHTS_FILE)
        timings["export_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        int8 = _int8(config, fp32, staging / INT8_FILE, train, valid)
        timings["int8_s"] = time.perf_counter() - t0
        served_logits = onnx_logits(staging / INT8_FILE if int8.kept else fp32, valid.x)
        served_probs = calibrated_probabilities(served_logits, spec)
        save_plots(valid_probs, valid.y, classes, cal.thresholds, staging / "plots")

        # the verdicts judge the model as it will serve (INT8 when kept)
        trust = assess(served_probs, valid.y, groups, classes, metrics.out_of_fold,
                       TrustRule(target_sensitivity=config.target_sensitivity), seed=config.seed)

        t0 = time.perf_counter()
        promotion = decide_promotion(served_probs, valid.x, valid.y, [i.image for i in valid.items], spec, trust,
                                     parent, config.not_worse_epsilon)
        timings["compare_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start

        card = build_card(labelled, spec, metrics, trust, int8, promotion, parent, left_out, len(train.y),
                          len(valid.y), config.valid_fraction, config, fit_info, body_from, max_diff, timings,
                          _threads(), source)
        version = registry.publish(staging, card)
    if promotion.become_current:
        registry.set_current(version.name)
    log.info("registered %s (%s): %s", version.name, "current" if promotion.become_current else "candidate",
             promotion.reason)
    return TrainResult(version, promotion.become_current, promotion.reason, tuple(left_out), timings)


def _refit_parent_ok(parent: ModelVersion | None, spec: ModelSpec) -> bool:
    return parent is not None and (parent.path / TORCH_WEIGHTS_FILE).is_file() \
        and tuple(parent.spec.classes) == tuple(spec.classes) \
        and parent.spec.preprocessing_version == spec.preprocessing_version \
        and parent.spec.input_size == spec.input_size


def resolve_mode(config: TrainConfig, parent: ModelVersion | None, spec: ModelSpec, n_labels: int) -> Mode:
    """'auto': a quick head-only refit on the current version's body until the labels have grown
    by ``refit_growth`` since that body was last fine-tuned; then a full fine-tune."""
    if config.mode != "auto":
        return config.mode
    if not _refit_parent_ok(parent, spec):
        return "fine_tune"
    full_labels = parent.card.training.full_fine_tune_labels
    return "head_only" if full_labels and n_labels < config.refit_growth * full_labels else "fine_tune"


def _initialise(learn, config: TrainConfig, parent: ModelVersion | None, spec: ModelSpec) -> str:
    """Load the starting weights: the parent version (head-only refits), ImageNet, or nothing (random)."""
    import torch

    if config.mode == "head_only" and _refit_parent_ok(parent, spec):
        learn.model.load_state_dict(torch.load(parent.path / TORCH_WEIGHTS_FILE, map_location="cpu",
                                               weights_only=True))
        return f"parent:{parent.name}"
    weights = imagenet_weights_file(config.pretrained_weights)
    if weights is not None:
        load_imagenet_body(learn.model[0], weights)
        return f"imagenet:{weights.name}"
    log.warning("NO PRETRAINED WEIGHTS: ImageNet ResNet18 weights were not found (set MAMMOFLAG_PRETRAINED_WEIGHTS "
                "or put resnet18-f37072fd.pth in the torch hub cache); training from RANDOM INITIALISATION, "
                "which needs more labels and epochs for the same accuracy")
    return "random-init"


def _int8(config: TrainConfig, fp32: Path, int8_path: Path, train: Inputs, valid: Inputs) -> Int8Outcome:
    if not config.quantize_int8:
        return Int8Outcome(False, "INT8 quantization switched off in the training config", None, None, None)
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(train.x), size=min(64, len(train.x)), replace=False)
    return try_int8(fp32, int8_path, train.x[np.sort(pick)], valid.x, valid.y, config.int8_max_auroc_drop)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())
