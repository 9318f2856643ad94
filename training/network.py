"""The default network: the whole image at low resolution, plus its candidate spots at full resolution.

``mammoflag.preprocess.model_input`` hands every network five uint8 planes: the image reduced to
``size`` (area, max, top-hat) and 64 (at 256 px) tiles of 32 x 32 display pixels around the image's
most marker-like spots (``preprocess.candidates``). Why this shape (benchmarks/bench_generalisation.py
has the figures):

- A biopsy marker is ~1 % of the long side: ~10 display pixels, ~2.5 at a 256 px input. No
  network tells a 2 px ring from a calcification or a letter of burned-in text, and a network
  that reads a 1024 px image costs ~16x one at 256. The tiles keep the marker's 10 pixels and
  cost 64 x 32 x 32 pixels (a quarter of a 512 px image): scoring only where needed.
- Multiple-instance pooling over the tiles: each tile gets its own logit per class from a small
  shared tile network, and the image's evidence is their smooth maximum (log-sum-exp): one tile
  with a marker raises ``biopsy_tool``, whatever the other 63 show. Every tile of a negative image
  is a clean negative (calcifications, vessels, text, noise), which is what lets a few hundred
  labels teach the tile network what a marker is *not*.
- The whole-image branch (a small fully-convolutional body, global max + average pooling)
  carries what is a property of the whole field (a magnification view: no background, zoomed
  texture, paddle edges) and large objects (needles, big clips). Its logits and the tiles'
  pooled logits are added.
- :class:`InputScale` maps the uint8 values to about -1..1 inside the network, so the ONNX model
  takes the very tensor the preprocessing makes.
- The tile network does not learn from the labels alone: trained end to end from random weights on a
  few hundred labels it ranked biopsy images at AUROC 0.35-0.58. ``training.train`` first trains it on
  a self-supervised pretext (``training/pretext.py``: procedural foreign objects pasted on the training
  images' own candidate tiles), then keeps it frozen and fits the rest; a class the pretext detector
  already ranks starts its tile classifier as that detector.
- Nor does the whole-image network learn what a magnification view is from a few dozen of them: it
  learns the shortcut the labels allow (no skin line in the field) and misses the rest. ``training.train``
  first trains it to tell how far a crop of a training image is zoomed (``training/pretext.py``), then
  keeps it frozen too; a view class starts its image classifier as the zoom regressor.
- Residual blocks with their last batch norm zero-initialised start as the identity, which is
  what lets a network trained from random weights on a few hundred images converge in minutes.

``build_network(arch, n_out)`` returns ``nn.Sequential(body, head)``: ``body`` ends in features (the
pooled whole-image features, then each tile's), ``head`` turns them into logits, so head-only refits
cache ``body`` outputs (``training.train.fit_head_on_cached_features``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_ARCHITECTURE = "markerpatch"
IMAGE_CHANNELS = 3  # area, max, top-hat (preprocess.CHANNELS[:3])
TILE_CHANNELS = (3, 4)  # patch, patch_tophat


@dataclass(frozen=True)
class Architecture:
    widths: tuple[int, ...]  # whole image: channels after the stem conv, then after each stride-2 stage
    blocks: tuple[int, ...]  # residual blocks after each stage but the stem (len(widths) - 1)
    tile_widths: tuple[int, ...] = ()  # tiles: channels of each stage; () = no tile branch
    tile_blocks: tuple[int, ...] = ()  # residual blocks after each tile stage
    tile_strides: tuple[int, ...] = ()  # stride of each tile stage's first conv
    dropout: float = 0.2
    lse_sharpness: float = 4.0  # log-sum-exp pooling of tile logits: -> max as it grows


ARCHITECTURES: dict[str, Architecture] = {
    # whole image at 256: stem 3->16 at 1/2, stages at 1/4 (24), 1/8 (48), 1/16 (96), 1/32 (192);
    # tiles 32 px -> 16 (16 channels) -> 8 (32) -> 8 (48, one residual block). A stride-1 first conv on
    # the 2-plane tiles cost a third of the whole model's time in ONNX Runtime (bench_flagger.py)
    "markerpatch": Architecture(widths=(16, 24, 48, 96, 192), blocks=(0, 1, 1, 1),
                                tile_widths=(16, 32, 48), tile_blocks=(0, 0, 1), tile_strides=(2, 2, 1)),
    # the whole image only (channels area, max, top-hat), e.g. at 512 px
    "markernet": Architecture(widths=(16, 24, 48, 96, 192), blocks=(0, 1, 1, 1)),
}


class InputScale(nn.Module):
    """uint8-valued input (0..255) to about -1..1; fixed (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 / 127.5) - 1.0


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBN(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)  # the block starts as the identity
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.conv1(x))))


class MaxAvgPool(nn.Module):
    """(N, C, H, W) -> (N, 2C): global max (multiple-instance: anywhere) then global average."""

    def __init__(self):
        super().__init__()
        self.max = nn.AdaptiveMaxPool2d(1)
        self.avg = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.max(x), self.avg(x)], dim=1).flatten(1)


class ImageBody(nn.Module):
    """The whole-image planes -> pooled features (N, 2 * widths[-1])."""

    def __init__(self, a: Architecture):
        super().__init__()
        layers: list[nn.Module] = [InputScale(), ConvBN(IMAGE_CHANNELS, a.widths[0], stride=2)]
        for i in range(1, len(a.widths)):
            layers.append(ConvBN(a.widths[i - 1], a.widths[i], stride=2))
            layers.extend(ResidualBlock(a.widths[i]) for _ in range(a.blocks[i - 1]))
        layers.append(MaxAvgPool())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :IMAGE_CHANNELS])


class TileBody(nn.Module):
    """The tiled candidate planes -> features per tile (N, tiles, 2 * tile_widths[-1])."""

    def __init__(self, a: Architecture, patch: int):
        super().__init__()
        self.patch = patch
        strides = a.tile_strides or (1,) + (2,) * (len(a.tile_widths) - 1)
        layers: list[nn.Module] = [InputScale()]
        for i, width in enumerate(a.tile_widths):
            layers.append(ConvBN(a.tile_widths[i - 1] if i else len(TILE_CHANNELS), width, stride=strides[i]))
            layers.extend(ResidualBlock(width) for _ in range(a.tile_blocks[i]))
        layers.append(MaxAvgPool())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, size, _ = x.shape
        p = self.patch
        g = size // p
        t = x[:, TILE_CHANNELS[0]:TILE_CHANNELS[-1] + 1, :g * p, :g * p]
        t = t.reshape(n, len(TILE_CHANNELS), g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        f = self.net(t.reshape(n * g * g, len(TILE_CHANNELS), p, p))
        return f.reshape(n, g * g, -1)


class Body(nn.Module):
    """Features: the whole image's (N, F) then, when the architecture has tiles, every tile's, flattened."""

    def __init__(self, a: Architecture, patch: int):
        super().__init__()
        self.image = ImageBody(a)
        self.tiles = TileBody(a, patch) if a.tile_widths else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.image(x)
        if self.tiles is None:
            return f
        return torch.cat([f, self.tiles(x).flatten(1)], dim=1)


class Head(nn.Module):
    """Logits = linear(whole-image features) + log-sum-exp over tiles of linear(tile features)."""

    def __init__(self, a: Architecture, n_out: int):
        super().__init__()
        self.image_features = 2 * a.widths[-1]
        self.tile_features = 2 * a.tile_widths[-1] if a.tile_widths else 0
        self.sharpness = a.lse_sharpness
        self.drop = nn.Dropout(a.dropout)
        self.image = nn.Linear(self.image_features, n_out)
        self.tile = nn.Linear(self.tile_features, n_out) if self.tile_features else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        logits = self.image(self.drop(f[:, :self.image_features]))
        if self.tile is None:
            return logits
        tiles = f[:, self.image_features:].reshape(f.shape[0], -1, self.tile_features)
        z = self.tile(self.drop(tiles)) * self.sharpness  # (N, tiles, classes)
        top = z.amax(dim=1, keepdim=True)  # log of the mean of exp(z), computed stably: a smooth maximum
        pooled = (top.squeeze(1) + torch.log(torch.exp(z - top).mean(dim=1))) / self.sharpness
        return logits + pooled


def build_network(arch: str, n_out: int, patch: int | None = None) -> nn.Sequential:
    """``nn.Sequential(body, head)`` for a named architecture (``ARCHITECTURES``)."""
    from mammoflag.preprocess import PATCH

    try:
        a = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}") from None
    body, head = Body(a, patch or PATCH), Head(a, n_out)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for m in body.modules():  # after the convs: the blocks' last batch norm stays at zero
        if isinstance(m, ResidualBlock):
            nn.init.zeros_(m.bn2.weight)
    return nn.Sequential(body, head)


def feature_size(arch: str, tiles: int = 0) -> int:
    a = ARCHITECTURES[arch]
    return 2 * a.widths[-1] + (tiles * 2 * a.tile_widths[-1] if a.tile_widths else 0)
