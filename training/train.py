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

from mammoflag.header_evidence import HEADER_FEATURES, evidence_matrix
from mammoflag.inference import EMBEDDING_OUTPUT, calibrated_probabilities
from mammoflag.novelty import fit_reference, novelty_path
from mammoflag.preprocess import CHANNELS, load_display_image, model_input
from mammoflag.registry import FP32_FILE, INT8_FILE, ModelVersion, Registry
from mammoflag.card import ModelCard, TrustRule
from mammoflag.settings import Settings
from label_config import FindingKind
from mammoflag.spec import ModelSpec
from training.calibrate import (HEADER_MIN_AUROC, calibrate, calibrated_spec, classes_told_by_header, metrics_by,
                                out_of_fold_metrics, out_of_fold_scores, save_plots, validation_metrics)
from training.dataset import LabelledImage, LabelledSet, LeftOut
from training.export import Int8Outcome, check_parity, export_onnx, onnx_logits, try_int8
from training.modelcard import build_card
from training.promotion import decide_promotion
from training.trust import assess

log = logging.getLogger(__name__)

TORCH_WEIGHTS_FILE = "model.pt"  # torch state dict kept beside the ONNX file: parent of head-only refits
Mode = Literal["fine_tune", "frozen", "head_only", "auto"]
RESNET18 = "resnet18"
NETWORK_LR = 2e-3  # one-cycle peak, AdamW, batch 16: the random-init networks of training/network.py


class NotEnoughLabels(ValueError):
    """Too few usable labelled images (or none on one side of the split) to train and validate."""


@dataclass(frozen=True)
class TrainConfig:
    mode: Mode = "fine_tune"  # auto: head_only while labels grew < refit_growth x since the last full fine-tune
    refit_growth: float = 1.5
    # the network: "auto" = training.network.DEFAULT_ARCHITECTURE, or resnet18 when ImageNet weights are given
    architecture: str = "auto"
    epochs: int | None = None  # whole-network epochs; None: ~train_image_passes / images, resnet18 3
    train_image_passes: int = 2400  # images seen in all (~10 epochs of 250): a fixed time budget
    min_epochs: int = 6
    max_epochs: int = 40
    best_epoch_from: float = 0.5  # keep the best validation epoch among the last half (not resnet18)
    frozen_epochs: int | None = None  # frozen-body epochs first; None: 1 for resnet18, 0 otherwise
    head_epochs: int = 8  # head epochs on cached features (head_only)
    batch_size: int = 16
    lr: float | None = None  # None: NETWORK_LR (one-cycle, AdamW); resnet18: lr_find (fastai's 'valley')
    lr_find_iterations: int = 20  # fastai default 100; 20 finds the valley within 2x and costs a fifth
    lr_floor: float = 1e-3  # lr_find's valley on a random-init body lands at 1e-4..6e-4, which underfits
    reuse_parent_lr: bool = True  # a fine-tune after a fine-tune takes the parent's lr and skips lr_find
    channels_last: bool = True
    # training-batch augmentation: flips, 90-degree turns, shifts within the letterbox margin, contrast /
    # brightness / gamma (a vendor's look) and noise; False: none at all
    augment: bool = True
    input_size: int | None = None  # None: the spec's
    valid_fraction: float = 0.2
    min_train: int = 8
    target_sensitivity: float = 0.95
    quantize_int8: bool = True
    int8_max_auroc_drop: float = 0.005
    not_worse_epsilon: float = 0.005  # new mean AUROC >= current's - epsilon, on the same validation images
    parity_tolerance: float = 1e-4
    pretrained_weights: Path | None = None  # ImageNet ResNet18 state dict (architecture resnet18 only)
    # where resnet18's ImageNet weights are downloaded from when neither that file nor torchvision's cached
    # one exists (Settings.pretrained_url); None: never download (random initialisation)
    pretrained_url: str | None = None
    # tile networks from random initialisation: self-supervised pretext steps first (training/pretext.py),
    # then the tile body stays frozen and each class's tile classifier starts as the pretext detector;
    # 0: none (the whole network from random weights). Cached per registry: paid once per project.
    pretext_steps: int = 400
    # and the whole-image body: zoom pretext steps (training/pretext.py: how far is a crop zoomed?), then it
    # stays frozen unless zoom_tuned, and each class the label config declares a view starts its image
    # classifier as the zoom regressor; 0: none. Cached per registry like the tile pretext.
    zoom_steps: int = 200
    zoom_tuned: bool = False
    # fit per-class header-evidence weights (mammoflag/header_evidence.py) beside the temperature; False: the
    # image alone (the header still goes to annotators as hints)
    header_evidence: bool = True
    threads: int | None = None
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, defaults: Mapping[str, str] | None = None,
                      **overrides: Any) -> "TrainConfig":
        """The settings' training knobs (``MAMMOFLAG_TRAIN_*``, read once into ``Settings.train_knobs``) over
        ``defaults``, then ``overrides``; the target sensitivity and weights file come from the settings."""
        return cls.from_knobs({**(defaults or {}), **settings.train_knobs},
                              target_sensitivity=settings.target_sensitivity,
                              pretrained_weights=settings.pretrained_weights,
                              pretrained_url=settings.pretrained_url or None, **overrides)

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, str], **overrides: Any) -> "TrainConfig":
        """Training knobs by name (mode, epochs, frozen_epochs, head_epochs, batch_size, lr, quantize_int8,
        threads, lr_find_iterations, architecture, train_image_passes, pretext_steps, zoom_steps, zoom_tuned,
        header_evidence) as the
        environment spells them;
        anything not set keeps its default."""
        flag = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
        names = {"mode": str, "epochs": int, "frozen_epochs": int, "head_epochs": int, "batch_size": int,
                 "lr": float, "quantize_int8": flag, "threads": int,
                 "lr_find_iterations": int, "architecture": str, "train_image_passes": int,
                 "pretext_steps": int, "zoom_steps": int, "zoom_tuned": flag, "header_evidence": flag}
        values: dict[str, Any] = {}
        for name, parse in names.items():
            raw = knobs.get(name)
            if raw:
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ValueError(f"MAMMOFLAG_TRAIN_{name.upper()}={raw!r}: {exc}") from exc
        config = cls(**{**values, **overrides})
        if config.mode not in ("fine_tune", "frozen", "head_only", "auto"):
            raise ValueError(f"MAMMOFLAG_TRAIN_MODE must be fine_tune, frozen, head_only or auto, not {config.mode!r}")
        from training.network import ARCHITECTURES

        if config.architecture not in ("auto", RESNET18, *ARCHITECTURES):
            raise ValueError(f"MAMMOFLAG_TRAIN_ARCHITECTURE must be auto, {RESNET18} or one of "
                             f"{sorted(ARCHITECTURES)}, not {config.architecture!r}")
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
    x: np.ndarray  # (N, len(CHANNELS), S, S) uint8 from mammoflag.preprocess.model_input
    y: np.ndarray  # (N, C) float32 0/1
    items: tuple[LabelledImage, ...]

    @property
    def header(self) -> np.ndarray:
        """(N, len(HEADER_FEATURES)): each image's header evidence (zeros where its task carried none)."""
        return evidence_matrix(i.header for i in self.items)


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
    x = np.stack(xs) if xs else np.zeros((0, len(CHANNELS), size, size), np.uint8)
    y = np.asarray(ys, dtype=np.float32).reshape(-1, n_classes)
    return Inputs(x, y, tuple(kept)), left_out


# -- weights -------------------------------------------------------------------------------------

def imagenet_weights_file(configured: Path | None, url: str | None = None,
                          timeout_s: float = 10.0) -> tuple[Path | None, bool]:
    """The ImageNet ResNet18 weights, and whether this call downloaded them: the configured file, else
    torchvision's file in the torch hub cache, else (``url`` given) that file downloaded into the cache as
    torchvision does, its SHA-256 checked (``mammoflag.fileio.download_checked``).
    Offline, or when the bytes do not match, it says why and returns (None, False): random initialisation."""
    if configured is not None:
        if Path(configured).is_file():
            return Path(configured), False
        log.warning("configured pretrained weights file %s does not exist", Path(configured).name)
    import torch
    from urllib.parse import urlparse

    from mammoflag.fileio import download_checked
    from mammoflag.settings import IMAGENET_RESNET18_URL

    name = Path(urlparse(url or IMAGENET_RESNET18_URL).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return cached, False
    if not url:
        return None, False
    log.info("ImageNet ResNet18 weights not found: downloading %s into %s", url, cached.parent)
    try:
        download_checked(url, cached, timeout_s)
    except (OSError, ValueError) as exc:  # offline, refused, timed out, HTTP error, or the wrong bytes
        log.warning("could not download ImageNet ResNet18 weights from %s (%s: %s)", url, type(exc).__name__, exc)
        return None, False
    log.warning("downloaded ImageNet ResNet18 weights from %s (SHA-256 checked) into %s", url, cached)
    return cached, True


def load_imagenet_body(body, weights_file: Path) -> None:
    """Copy torchvision ResNet18 weights into fastai's body (the ResNet minus its pool and fc)."""
    import torch
    from torch import nn
    from torchvision.models import resnet18

    reference = resnet18()
    reference.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    # body[0] is an ImageNetInputConv: conv1's parameters, plus the input normalisation (no state)
    body.load_state_dict(nn.Sequential(*list(reference.children())[:-2]).state_dict())


# -- fastai plumbing -----------------------------------------------------------------------------

def resolve_architecture(config: TrainConfig) -> str:
    """'auto': training.network.DEFAULT_ARCHITECTURE, unless ImageNet ResNet18 weights are configured and exist."""
    if config.architecture != "auto":
        return config.architecture
    if config.pretrained_weights is not None and Path(config.pretrained_weights).is_file():
        return RESNET18
    from training.network import DEFAULT_ARCHITECTURE

    return DEFAULT_ARCHITECTURE


def epochs_for(config: TrainConfig, n_train: int) -> int:
    """Whole-network epochs: as configured, else a fixed budget of image passes, or 3 for resnet18."""
    if config.epochs is not None:
        return config.epochs
    if resolve_architecture(config) == RESNET18:
        return 3
    return int(min(config.max_epochs, max(config.min_epochs, round(config.train_image_passes / max(1, n_train)))))


def frozen_epochs_for(config: TrainConfig) -> int:
    if config.frozen_epochs is not None:
        return config.frozen_epochs
    return 1 if resolve_architecture(config) == RESNET18 else 0


def _imagenet_input_conv(conv):
    """ResNet18's conv1 for the uint8-valued model input: normalises as ImageNet weights expect, then convolves."""
    import torch
    from torch import nn

    from mammoflag.preprocess import IMAGENET_MEAN, IMAGENET_STD

    class ImageNetInputConv(nn.Conv2d):
        def __init__(self):
            super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             bias=conv.bias is not None)
            # not persistent: the state dict stays torchvision's conv1 (ImageNet weights load as they are)
            self.register_buffer("scale", torch.from_numpy(1 / (255 * IMAGENET_STD)).view(1, -1, 1, 1),
                                 persistent=False)
            self.register_buffer("shift", torch.from_numpy(IMAGENET_MEAN / IMAGENET_STD).view(1, -1, 1, 1),
                                 persistent=False)

        def forward(self, x):  # the whole-image planes (area, max, top-hat) as the three colours
            return super().forward(x[:, :3] * self.scale - self.shift)

    new = ImageNetInputConv()
    new.load_state_dict(conv.state_dict())
    return new


def _callbacks(config: TrainConfig):
    import torch
    from fastai.callback.core import Callback

    class AsFloat(Callback):
        """uint8 model inputs -> float 0..255 (the network scales them itself)."""

        order = -9

        def before_batch(self):
            self.learn.xb = tuple(x.float() if x.dtype == torch.uint8 else x for x in self.learn.xb)

    class Augment(Callback):
        """Training batches only: the 8 flips / quarter turns, a shift within the letterbox margin (nothing
        leaves the frame: a marker cut by the edge stays as cut as it was), and a vendor look: contrast,
        brightness and gamma applied consistently to the area / max / top-hat channels, plus noise."""

        order = -8

        def before_batch(self):
            if not self.training:
                return
            x = self.learn.xb[0]
            n, _, size, _ = x.shape
            out = torch.empty_like(x)
            turns = torch.randint(0, 4, (n,)).tolist()
            flips = (torch.rand(n) < 0.5).tolist()
            for i in range(n):
                xi = x[i]
                if flips[i]:
                    xi = xi.flip(2)
                if turns[i]:  # the tiles turn with the canvas: each tile turns, their order changes (no matter)
                    xi = torch.rot90(xi, turns[i], (1, 2))
                out[i] = xi
                out[i, :3] = _shift_within_margin(xi[:3], int(0.1 * size))  # the whole image only
            a = torch.exp(torch.empty(n, 1, 1).uniform_(math.log(0.75), math.log(1.33)))
            b = torch.empty(n, 1, 1).uniform_(-20, 20)
            g = torch.exp(torch.empty(n, 1, 1).uniform_(math.log(0.7), math.log(1.45)))

            def look(v):
                return (255 * a * (v * (1 / 255)).clamp(0, 1) ** g + b).clamp(0, 255)

            area, peak, hat = out[:, 0], out[:, 1], out[:, 2]
            background = (peak - hat).clamp(min=0)  # what the top-hat was measured against
            new_peak = look(peak)
            planes = [look(area), new_peak, (new_peak - look(background)).clamp(min=0)]
            if out.shape[1] > 3:  # tiles: display pixels and their top-hat
                tile, tile_hat = out[:, 3], out[:, 4]
                new_tile = look(tile)
                blank = tile == 0  # tiles without a candidate stay black
                planes += [new_tile.masked_fill(blank, 0),
                           (new_tile - look((tile - tile_hat).clamp(min=0))).clamp(min=0).masked_fill(blank, 0)]
            out = torch.stack(planes, dim=1)
            sigma = torch.empty(n, 1, 1, 1).uniform_(0, 4)
            out = (out + torch.randn_like(out) * sigma).clamp(0, 255)
            self.learn.xb = (out,)

    class BestEpoch(Callback):
        """Keep the weights of the best validation epoch (mean AUROC, then loss) among the later epochs."""

        order = 70

        def __init__(self, from_fraction: float):
            self.from_fraction = from_fraction

        def before_fit(self):
            self.best, self.best_state, self.history = None, None, []

        def before_validate(self):
            self.preds, self.targets = [], []

        def after_batch(self):
            if not self.training:
                self.preds.append(self.learn.pred.detach().float())
                self.targets.append(self.learn.yb[0].detach().float())

        def after_epoch(self):
            from training.calibrate import auroc

            if not self.preds:
                return
            logits, y = torch.cat(self.preds).numpy(), torch.cat(self.targets).numpy()
            aurocs = [a for k in range(y.shape[1]) if (a := auroc(logits[:, k], y[:, k])) is not None]
            loss = float(torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits),
                                                                              torch.from_numpy(y)))
            score = (float(np.mean(aurocs)) if aurocs else 0.0, -loss)
            self.history.append({"epoch": self.epoch, "valid_mean_auroc": score[0], "valid_loss": loss})
            if self.epoch >= int(self.from_fraction * self.n_epoch) and (self.best is None or score > self.best):
                self.best, self.chosen_epoch = score, self.epoch
                self.best_state = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}

        def after_fit(self):
            if self.best_state is not None:
                self.learn.model.load_state_dict(self.best_state)

    class ChannelsLastCPU(Callback):
        """channels_last model and inputs (no mixed precision: it does not help on CPU)."""

        order = -1

        def before_fit(self):
            self.learn.model.to(memory_format=torch.channels_last)

        def before_batch(self):
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
                                  for x in self.learn.xb)

    cbs = [AsFloat()]
    if config.augment:
        cbs.append(Augment())
    if resolve_architecture(config) != RESNET18 and config.best_epoch_from < 1:
        cbs.append(BestEpoch(config.best_epoch_from))
    if config.channels_last:
        cbs.append(ChannelsLastCPU())
    return cbs


def _shift_within_margin(x, limit: int):
    """Move a (C, S, S) image by up to ``limit`` px per axis, only into its black margins (no pixel leaves)."""
    import torch

    occupied = x.amax(0) > 0
    rows, cols = torch.nonzero(occupied.any(1)).flatten(), torch.nonzero(occupied.any(0)).flatten()
    if len(rows) == 0:
        return x
    size_y, size_x = occupied.shape
    dy = int(torch.randint(-min(limit, int(rows[0])), min(limit, size_y - 1 - int(rows[-1])) + 1, ()).item())
    dx = int(torch.randint(-min(limit, int(cols[0])), min(limit, size_x - 1 - int(cols[-1])) + 1, ()).item())
    if dy == 0 and dx == 0:
        return x
    return torch.roll(x, (dy, dx), (1, 2))  # only black margin wraps round


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
    if resolve_architecture(config) != RESNET18:
        return NETWORK_LR
    suggestion = learn.lr_find(num_it=config.lr_find_iterations, show_plot=False)
    lr = float(suggestion.valley)
    if not math.isfinite(lr) or lr <= 0:
        lr = 2e-3
    # measured (benchmarks/results/training.json): the valley is too cautious on a random body, and on
    # tiny sets it can land where the loss is still falling steeply; keep it within a sane band
    return float(min(max(lr, config.lr_floor), 1e-2))


def build_learner(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray, n_classes: int,
                  config: TrainConfig):
    """A fastai Learner whose model is ``nn.Sequential(body, head)`` (body: image -> features)."""
    import fastai.callback.schedule  # noqa: F401  (patches Learner with lr_find, fit_one_cycle, fine_tune)
    from fastai.learner import Learner
    from fastai.losses import BCEWithLogitsLossFlat
    from fastai.torch_core import params

    dls = _dataloaders(x, y, vx, vy, config.batch_size, config.seed)
    arch = resolve_architecture(config)
    if arch == RESNET18:
        from fastai.vision.learner import vision_learner
        from torchvision.models import resnet18

        # normalize=False: the body's first conv normalises the uint8-valued input itself
        learn = vision_learner(dls, resnet18, normalize=False, pretrained=False, n_out=n_classes,
                               loss_func=BCEWithLogitsLossFlat(), cbs=_callbacks(config))
        learn.model[0][0] = _imagenet_input_conv(learn.model[0][0])
    else:
        from training.network import build_network

        learn = Learner(dls, build_network(arch, n_classes), loss_func=BCEWithLogitsLossFlat(),
                        splitter=lambda m: [params(m[0]), params(m[1])], cbs=_callbacks(config))
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
                xb = torch.from_numpy(np.asarray(arr[i:i + 64], dtype=np.float32))
                if config.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                out.append(body(xb).contiguous().numpy())
            return np.concatenate(out)

        fx, fvx = features(x), features(vx)
    t_features = time.perf_counter() - t0
    dls = _dataloaders(fx, y, fvx, vy, config.batch_size, config.seed)
    head_learn = Learner(dls, head, loss_func=BCEWithLogitsLossFlat())
    _quiet(head_learn)
    lr = config.lr if config.lr is not None else _find_lr(head_learn, replace(config, lr=None, architecture=RESNET18))
    head_learn.fit_one_cycle(config.head_epochs, lr)
    return {"feature_cache_s": t_features, "lr": lr}


def fit(learn, x, y, vx, vy, config: TrainConfig, pretrained: bool) -> dict[str, Any]:
    """Fit the learner in the configured mode; returns what was done (for the model card)."""
    if config.mode == "head_only":
        return {"mode": "head_only", **fit_head_on_cached_features(learn, x, y, vx, vy, config)}
    arch = resolve_architecture(config)
    frozen, epochs = frozen_epochs_for(config), epochs_for(config, len(y))
    info: dict[str, Any] = {"architecture": arch}
    if config.mode == "frozen" or arch == RESNET18:
        learn.freeze()  # lr_find and the first epochs on the head (the body is random or ImageNet)
    lr = _find_lr(learn, config)
    if config.mode == "frozen":
        learn.fit_one_cycle(max(1, frozen), lr)
        return {"mode": "frozen", "lr": lr, "frozen_epochs": max(1, frozen), **info}
    if arch == RESNET18:
        # discriminative learning rates protect ImageNet features; a random body must learn at full rate
        learn.fine_tune(epochs, base_lr=lr, freeze_epochs=frozen, lr_mult=100 if pretrained else 1)
    else:
        if frozen:
            learn.freeze()
            learn.fit_one_cycle(frozen, lr)
            learn.unfreeze()
        learn.fit_one_cycle(epochs, lr)  # random init: the whole network at full rate from the start
        best = next((cb for cb in learn.cbs if type(cb).__name__ == "BestEpoch"), None)
        if best is not None and best.best is not None:
            info.update(best_epoch=best.chosen_epoch, epoch_history=best.history)
    return {"mode": "fine_tune", "lr": lr, "frozen_epochs": frozen, "epochs": epochs, **info}


# -- the core ------------------------------------------------------------------------------------

def train_version(labelled: LabelledSet, spec: ModelSpec, registry: Registry, config: TrainConfig,
                  source: Mapping[str, Any] | None = None) -> TrainResult:
    """Train, calibrate, export, check and register one version; move ``current`` only if not worse."""
    import torch
    from fastai.torch_core import set_seed

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    size = config.input_size or spec.input_size
    config = replace(config, architecture=resolve_architecture(config))
    spec = replace(spec, input_size=size, architecture=config.architecture)
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
    pretrained = body_from != "random-init"
    t_pretext = time.perf_counter()
    tile_start: dict[str, TileStart] = {}
    zoom_start: dict[str, ZoomStart] = {}
    if body_from == "random-init" and config.mode != "head_only":
        body_from, tile_start = _pretext_start(learn, config, train.x, train.y, registry, spec)
        zoom_from, zoom_start = _zoom_start(learn, config, train, registry, spec)
        if zoom_from:
            body_from = zoom_from if body_from == "random-init" else f"{body_from}+{zoom_from}"
    t_pretext = time.perf_counter() - t_pretext
    # the fit draws the same random stream whether the pretext was trained just now or read from the cache
    set_seed(config.seed, reproducible=True)
    fit_info = fit(learn, train.x, train.y, valid.x, valid.y, config, pretrained=pretrained)
    if tile_start or zoom_start:
        fit_info["pretext_s"] = round(t_pretext, 1)
    if tile_start:
        fit_info["tile_start"] = {c: t.to_json() for c, t in tile_start.items()}
    if zoom_start:
        fit_info["zoom_start"] = {c: z.to_json() for c, z in zoom_start.items()}
    fit_info["lr_source"] = lr_source
    timings["fit_s"] = time.perf_counter() - t0

    model = learn.model.eval().to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    from training.export import torch_logits

    valid_logits = torch_logits(model, valid.x)
    groups = [i.group for i in valid.items]
    header, header_classes = None, ()
    if config.header_evidence:
        header = valid.header
        told = classes_told_by_header(np.concatenate([train.header, valid.header]), np.concatenate([train.y, valid.y]),
                                      [i.group for i in train.items] + groups, classes)
        header_classes = tuple(c for c, a in told.items() if a is not None and a >= HEADER_MIN_AUROC)
        fit_info["header_auroc"] = {c: None if a is None else round(a, 3) for c, a in told.items()}
    cal = calibrate(valid_logits, valid.y, classes, config.target_sensitivity, header=header,
                    header_classes=header_classes)
    spec = calibrated_spec(spec, cal)
    valid_probs = calibrated_probabilities(valid_logits, spec, header)
    metrics = validation_metrics(
        valid_probs, valid.y, classes, cal.thresholds,
        by_manufacturer=metrics_by(valid_probs, valid.y, [i.manufacturer for i in valid.items], classes,
                                   cal.thresholds),
        out_of_fold=out_of_fold_metrics(valid_logits, valid.y, groups, classes, config.target_sensitivity,
                                        header=header, header_classes=header_classes))
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
        t0 = time.perf_counter()
        fit_info["novelty"] = _novelty_references(staging, [fp32, *([staging / INT8_FILE] if int8.kept else [])],
                                                  train, valid)
        timings["novelty_s"] = time.perf_counter() - t0
        served_logits = onnx_logits(staging / INT8_FILE if int8.kept else fp32, valid.x)
        served_probs = calibrated_probabilities(served_logits, spec, header)
        save_plots(valid_probs, valid.y, classes, cal.thresholds, staging / "plots")

        # the verdicts judge the model as it will serve (INT8 when kept); header weights are fitted on these
        # very images, so with them the AUROC is judged out of fold (each half weighted by the other's fit)
        judged, fused = served_probs, tuple(cal.header_weights)
        if fused:
            folds = out_of_fold_scores(served_logits, valid.y, groups, classes, config.target_sensitivity,
                                       header=header, header_classes=header_classes)
            if folds is not None:
                judged = served_probs.copy()
                for k, c in enumerate(classes):
                    if c in fused:
                        judged[:, k] = folds.probs[:, k]
            else:
                fused = ()
        trust = assess(judged, valid.y, groups, classes, metrics.out_of_fold,
                       TrustRule(target_sensitivity=config.target_sensitivity), seed=config.seed,
                       out_of_fold_classes=fused)

        t0 = time.perf_counter()
        promotion = decide_promotion(served_probs, valid.x, valid.y, [i.image for i in valid.items], spec, trust,
                                     parent, config.not_worse_epsilon, header)
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
        and parent.spec.input_size == spec.input_size and parent.spec.architecture == spec.architecture


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
    if resolve_architecture(config) != RESNET18:
        log.warning("training %s from RANDOM INITIALISATION (no pretrained weights exist for it%s; "
                    "benchmarks/bench_generalisation.py measures what that reaches)", resolve_architecture(config),
                    _pretext_words(config))
        return "random-init"
    weights, downloaded = imagenet_weights_file(config.pretrained_weights, config.pretrained_url)
    if weights is not None:
        load_imagenet_body(learn.model[0], weights)
        return f"imagenet:{'downloaded:' if downloaded else ''}{weights.name}"
    log.warning("NO PRETRAINED WEIGHTS: ImageNet ResNet18 weights were not found%s (set MAMMOFLAG_PRETRAINED_WEIGHTS "
                "or put resnet18-f37072fd.pth in the torch hub cache); training from RANDOM INITIALISATION, "
                "which needs more labels and epochs for the same accuracy",
                "" if config.pretrained_url else " and downloading is off (MAMMOFLAG_PRETRAINED_DOWNLOAD=0)")
    return "random-init"


# A class the label config leaves undeclared starts from the detector when the detector ranks its training
# images better than chance. That estimate is a coin flip at these label counts (~13 positives: the AUROC's
# standard error is ~0.08), which is why the label config's kind decides where it is declared: biopsy_tool
# fell to test AUROC 0.48-0.52 on 4 of ~30 label-efficiency curves whose training images happened to give
# the detector 0.50-0.59 (cuts 0.5-0.6), against 0.67-0.68 from the same labels started from the detector
# (benchmarks/bench_label_efficiency.py, 2026-12-03). A whole-field class (mag_view) sits below chance,
# 0.28-0.46, and starting it from the detector costs it (0.90 -> 0.73 on one draw).
PRETEXT_CLASS_AUROC = 0.5


@dataclass(frozen=True)
class TileStart:
    """How one class's tile classifier started, and what decided it (the model card keeps it)."""

    detector: bool  # True: as the pretext detector; False: at zero
    detector_auroc: float | None  # the detector's image AUROC on the class's training images
    decided_by: str  # "label config: object" / "label config: view" / "training images"

    def to_json(self) -> dict[str, Any]:
        return {"start": "detector" if self.detector else "zero",
                "detector_auroc": None if self.detector_auroc is None else round(self.detector_auroc, 3),
                "decided_by": self.decided_by}


def tile_start_for(kind: FindingKind | None, detector_auroc: float | None) -> TileStart:
    """Whether a class's tiles start as the foreign-object detector: the declared kind when there is one
    (an object class always, a whole-field class never), else the detector's ranking of its training images."""
    if kind is FindingKind.OBJECT:
        return TileStart(True, detector_auroc, "label config: object")
    if kind is FindingKind.VIEW:
        return TileStart(False, detector_auroc, "label config: view")
    return TileStart(detector_auroc is not None and detector_auroc >= PRETEXT_CLASS_AUROC, detector_auroc,
                     "training images")


def _pretext_start(learn, config: TrainConfig, x: np.ndarray, y: np.ndarray, registry: Registry,
                   spec: ModelSpec) -> tuple[str, dict[str, TileStart]]:
    """A tile network's start from the pretext (training/pretext.py): the tile body pretrained (or read from the
    registry's cache, keyed by architecture, preprocessing, pretext version and steps) and frozen. A class the
    label config declares an object (or, undeclared, whose training images the pretext detector already ranks:
    image score = its best tile, AUROC >= ``PRETEXT_CLASS_AUROC``) starts its tile classifier as that detector;
    the others start at zero, so tiles add nothing to them until the labels say so (a magnification view is
    not a marker). Returns what the body started from ("random-init" when there is no tile body) and each
    class's :class:`TileStart`."""
    import torch

    from training.network import TILE_CHANNELS
    from training.calibrate import auroc
    from training.pretext import (PRETEXT_VERSION, PretextConfig, best_tile_scores, candidate_tiles,
                                  pretrain_tile_body)

    body, head = learn.model[0], learn.model[1]
    tiles_body = getattr(body, "tiles", None)
    if config.pretext_steps <= 0 or tiles_body is None or getattr(head, "tile", None) is None:
        return "random-init", {}
    cache = _pretext_cache(registry, config, PRETEXT_VERSION, config.pretext_steps)
    state = _read_pretext_cache(cache, tiles_body.net)
    if state is None:
        tiles = candidate_tiles(x, (TILE_CHANNELS[0], TILE_CHANNELS[-1]), tiles_body.patch)
        if len(tiles) == 0:
            return "random-init", {}
        w, b = pretrain_tile_body(tiles_body.net, head.tile_features, tiles,
                                  PretextConfig(steps=config.pretext_steps, seed=config.seed))
        state = _write_pretext_cache(cache, tiles_body.net, w, b)
        source = "pretext"
    else:
        source = "pretext:cached"
    tiles_body.eval()
    scores = best_tile_scores(tiles_body, x, state["weight"].numpy(), float(state["bias"]),
                              (TILE_CHANNELS[0], TILE_CHANNELS[-1]), tiles_body.patch)
    starts: dict[str, TileStart] = {}
    with torch.no_grad():
        head.tile.weight.zero_()
        head.tile.bias.zero_()
        for k, c in enumerate(spec.classes):
            start = starts[c] = tile_start_for(spec.kinds.get(c), auroc(scores, y[:, k]))
            if start.detector:
                head.tile.weight[k].copy_(state["weight"].reshape(-1))
                head.tile.bias[k] = float(state["bias"])
            log.info("%s: pretext detector on its training images AUROC %s -> tiles start %s (%s)", c,
                     "n/a" if start.detector_auroc is None else f"{start.detector_auroc:.2f}",
                     "as the detector" if start.detector else "at zero", start.decided_by)
    _freeze(learn, "tiles")
    return f"{source}:{config.pretext_steps}", starts


ZOOM_CLASS_AUROC = 0.75  # an undeclared class starts as the zoom regressor when it ranks its images this well
# a view class's image logit starts as ZOOM_LOGIT_SLOPE * (predicted log zoom - log ZOOM_CUT): a contact view
# (zoom 1) at about -2.4, a 1.8x magnification at about +2.3; the fit moves both
ZOOM_CUT = 1.35
ZOOM_LOGIT_SLOPE = 8.0


@dataclass(frozen=True)
class ZoomStart:
    """How one class's whole-image classifier started, and what decided it (the model card keeps it)."""

    zoom: bool  # True: as the zoom regressor; False: as initialised
    zoom_auroc: float | None  # the predicted zoom's image AUROC on the class's training images
    decided_by: str  # as TileStart's

    def to_json(self) -> dict[str, Any]:
        return {"start": "zoom" if self.zoom else "init",
                "zoom_auroc": None if self.zoom_auroc is None else round(self.zoom_auroc, 3),
                "decided_by": self.decided_by}


def zoom_start_for(kind: FindingKind | None, zoom_auroc: float | None) -> ZoomStart:
    """Whether a class's image classifier starts as the zoom regressor: a declared view always, a declared
    object never, an undeclared class when the predicted zoom ranks its training images (``ZOOM_CLASS_AUROC``)."""
    if kind is FindingKind.VIEW:
        return ZoomStart(True, zoom_auroc, "label config: view")
    if kind is FindingKind.OBJECT:
        return ZoomStart(False, zoom_auroc, "label config: object")
    return ZoomStart(zoom_auroc is not None and zoom_auroc >= ZOOM_CLASS_AUROC, zoom_auroc, "training images")


def _zoom_start(learn, config: TrainConfig, train: Inputs, registry: Registry,
                spec: ModelSpec) -> tuple[str, dict[str, ZoomStart]]:
    """The whole-image body's start from the zoom pretext (training/pretext.py), pretrained on crops of the
    training images' display images (or read from the registry's cache, keyed like the tile pretext's), then
    frozen unless ``config.zoom_tuned``. A class declared a view (or, undeclared, whose training images the
    predicted zoom ranks: ``zoom_start_for``) starts its image classifier as the zoom regressor. Returns what
    the body started from ("" when there is no zoom pretext) and each class's :class:`ZoomStart`."""
    import torch

    from training.calibrate import auroc
    from training.pretext import ZOOM_PRETEXT_VERSION, ZoomConfig, pretrain_image_body, zoom_crops

    body, head = learn.model[0], learn.model[1]
    image_body = getattr(body, "image", None)
    if config.zoom_steps <= 0 or image_body is None or getattr(head, "image", None) is None or not train.items:
        return "", {}
    cache = _pretext_cache(registry, config, ZOOM_PRETEXT_VERSION, config.zoom_steps)
    state = _read_pretext_cache(cache, image_body)
    if state is None:
        zc = ZoomConfig(steps=config.zoom_steps, seed=config.seed)
        rng = np.random.default_rng(config.seed)
        crops, zooms = [], []
        for item in train.items:
            try:
                c, z = zoom_crops(rng, load_display_image(item.image), train.x.shape[-1], zc)
            except Exception as exc:  # load_inputs read it a moment ago; a file that changed since is skipped
                log.warning("zoom pretext: task %s skipped (%s)", item.task_id, type(exc).__name__)
                continue
            crops.append(c)
            zooms.append(z)
        if not crops:
            return "", {}
        w, b = pretrain_image_body(image_body, head.image_features, np.concatenate(crops), np.concatenate(zooms), zc)
        state = _write_pretext_cache(cache, image_body, w, b)
        source = "zoom"
    else:
        source = "zoom:cached"
    image_body.eval()
    weight, bias = state["weight"].reshape(-1), float(state["bias"])
    starts: dict[str, ZoomStart] = {}
    with torch.no_grad():
        predicted = torch.cat([image_body(torch.from_numpy(train.x[i:i + 32]).float()) @ weight
                               for i in range(0, len(train.x), 32)]).numpy() + bias
        for k, c in enumerate(spec.classes):
            start = starts[c] = zoom_start_for(spec.kinds.get(c), auroc(predicted, train.y[:, k]))
            if start.zoom:
                head.image.weight[k].copy_(ZOOM_LOGIT_SLOPE * weight)
                head.image.bias[k] = ZOOM_LOGIT_SLOPE * (bias - math.log(ZOOM_CUT))
            log.info("%s: predicted zoom on its training images AUROC %s -> image classifier starts %s (%s)", c,
                     "n/a" if start.zoom_auroc is None else f"{start.zoom_auroc:.2f}",
                     "as the zoom regressor" if start.zoom else "as initialised", start.decided_by)
    if not config.zoom_tuned:
        _freeze(learn, "image")
    return f"{source}:{config.zoom_steps}", starts


def _pretext_cache(registry: Registry, config: TrainConfig, version: str, steps: int) -> Path:
    """Where a registry keeps a pretext-trained body: keyed by architecture, preprocessing, pretext version,
    steps and seed, so a release that changes any of them pretrains again."""
    from mammoflag.spec import PREPROCESSING_VERSION

    return (registry.root / "pretext"
            / f"{resolve_architecture(config)}-{PREPROCESSING_VERSION}-{version}-{steps}-s{config.seed}.pt")


def _read_pretext_cache(cache: Path, module) -> dict[str, Any] | None:
    """The cached state ({"body", "weight", "bias"}) with ``module`` loaded from it; None when there is none or
    it is unusable (a stale or damaged cache is rebuilt, never trusted)."""
    import torch

    if not cache.is_file():
        return None
    try:
        state = torch.load(cache, map_location="cpu", weights_only=True)
        module.load_state_dict(state["body"])
    except Exception as exc:
        log.warning("pretext cache %s unusable (%s): pretraining again", cache.name, type(exc).__name__)
        return None
    return state


def _write_pretext_cache(cache: Path, module, weight: np.ndarray, bias: float) -> dict[str, Any]:
    """Keep ``module``'s pretrained state and its pretext head's (weight, bias) at ``cache`` (atomically)."""
    import io

    import torch

    from mammoflag.fileio import atomic_write

    state = {"body": module.state_dict(), "weight": torch.from_numpy(weight), "bias": torch.tensor(bias)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, buffer.getvalue())
    return state


def _freeze(learn, part: str) -> None:
    """``learn.model[0].<part>`` (a pretext-trained body) takes no gradient now and stays as it is through the fit."""
    for p in getattr(learn.model[0], part).parameters():
        p.requires_grad_(False)
    learn.add_cb(_frozen_callback(part))


def _pretext_words(config: TrainConfig) -> str:
    """What the log says of the self-supervised starts a random-init network gets."""
    parts = [name for name, steps in (("tile", config.pretext_steps), ("whole-image", config.zoom_steps)) if steps > 0]
    return f"; its {' and '.join(parts)} network{'s start' if len(parts) > 1 else ' starts'} from a self-supervised " \
           f"pretext" if parts else ""


def _frozen_callback(part: str):
    """A callback that keeps ``learn.model[0].<part>`` (a pretext-trained body) as it is through the fit."""
    from fastai.callback.core import Callback

    class Frozen(Callback):
        """The pretext-trained body part stays as it is: no gradient, and its batch norms keep their statistics."""

        order = -5

        def before_batch(self):
            module = getattr(self.learn.model[0], part)
            for p in module.parameters():
                p.requires_grad_(False)
            if self.training:
                module.eval()

    Frozen.__name__ = f"Frozen{part.title()}"  # fastai names a callback after its class: one attribute each
    return Frozen()


def _novelty_references(staging: Path, files: Sequence[Path], train: Inputs, valid: Inputs) -> dict[str, Any]:
    """Each served file's novelty reference (``mammoflag.novelty``) beside it; what was kept, for the card."""
    kept: dict[str, Any] = {}
    for f in files:
        try:
            ref = fit_reference(f.name, onnx_logits(f, train.x, output=EMBEDDING_OUTPUT),
                                onnx_logits(f, valid.x, output=EMBEDDING_OUTPUT), [i.group for i in valid.items])
        except ValueError as exc:
            log.warning("no novelty reference for %s: %s", f.name, exc)
            return {"kept": False, "reason": str(exc)}
        ref.save(novelty_path(staging, f.name))
        kept[f.name] = {"reference_distance": round(ref.reference_distance, 4), "k": ref.k,
                        "patients": len(ref.patient_means)}
    return {"kept": True, "n_train": len(train.y), "n_validation": len(valid.y), "files": kept}


def _int8(config: TrainConfig, fp32: Path, int8_path: Path, train: Inputs, valid: Inputs) -> Int8Outcome:
    if not config.quantize_int8:
        return Int8Outcome(False, "INT8 quantization switched off in the training config", None, None, None)
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(train.x), size=min(64, len(train.x)), replace=False)
    return try_int8(fp32, int8_path, train.x[np.sort(pick)], valid.x, valid.y, config.int8_max_auroc_drop)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())
