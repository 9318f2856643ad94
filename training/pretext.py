"""Self-supervised start for the tile network: find procedural foreign objects pasted on real tiles.

Why: from random initialisation, a few hundred image-level labels teach the tile network next to
nothing about small markers (benchmarks/results/generalisation.json: biopsy_tool AUROC 0.35-0.58
with the network trained end to end). The multiple-instance signal reaching the marker's tile is
1/64 of each positive image's gradient, and ~50 positive images across nine marker shapes give a
handful of examples per shape. A pretext task needs no labels: candidate tiles of the training
images (real tissue, calcifications, vessels, text, whatever the archive holds) get, half of them,
a procedurally drawn object pasted in, and the tile network learns to tell which. Metal and other
foreign objects are geometric (strokes, arcs, bars, crosses, coils, spheres), uniform in
attenuation and sharp-edged; tissue is not. Measured across synthetic families
(benchmarks/bench_tile_heads.py, 350 labels): the pretext detector alone, with no labels, ranks the
other family's biopsy images at AUROC 0.67-0.69, a multiple-instance head fitted on its frozen
features at 0.63-0.64; fine-tuning the whole tile network on the labels afterwards lost the prior
(0.53-0.60 in a scratch run of an earlier session), so the tile body stays frozen.

Objects are pasted only on tiles over tissue (``over_tissue``): the tiles over air keep what they hold,
burned-in text and lead laterality letters, as the pretext's negatives. A biopsy marker lies in the
breast; letters and numbers in the air are just as geometric, sharp and bright, and pasting strokes
onto the black around them taught the detector that strokes on black are foreign objects
(``benchmarks/bench_pretext.py``: the detector alone ranked two test families' biopsy images at
AUROC 0.69 pasting everywhere, 0.72 over tissue only, 2 seeds each, better in all 4 pairs).

The objects are drawn here, from shape primitives of their own (random polylines, arcs, bars,
crosses, spirals, spheres, at random sizes, strokes, contrasts, saturated or faint), not by the
synthetic cohort generator (``importers/synthetic.py``): the prior must not be the test's answer.

This is the CutPaste / DRAEM family of self-supervised anomaly pretexts (Li et al. CVPR 2021;
Zavrtanik et al. ICCV 2021) applied to the candidate tiles of ``mammoflag.preprocess``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from mammoflag.preprocess import PATCH

log = logging.getLogger(__name__)

# Bump when the pretext itself changes (its objects, how they are pasted, how the body is trained): the
# registry's cached tile body (training.train._pretext_start) is keyed by it, so a release that changes the
# pretext pretrains again instead of reusing a body trained on the old one.
PRETEXT_VERSION = "paste-objects-v2-tissue"
SUPERSAMPLE = 4  # objects are drawn 4x finer and area-averaged: partial-volume edges, sub-pixel strokes
KINDS = ("polyline", "arc", "bar", "cross", "spiral", "spheres")
# A tile is over air when the local background at its centre (the display minus its top-hat: the morphological
# opening, the level under any small object) is below this display level. Air is displayed black (~0) and the
# faintest tissue at the skin line some tens of levels above it (2.5 % of the shifted family's candidate tiles
# lie below 4, none between 4 and ~50).
AIR_LEVEL = 12


@dataclass(frozen=True)
class PretextConfig:
    steps: int = 400  # optimizer steps of ``batch`` tiles (loss ~0.17 after 100, ~0.12 after 800)
    batch: int = 256
    lr: float = 3e-3
    saturated_rate: float = 0.4  # objects at the top of the display range (metal over the window)
    contrast: tuple[float, float] = (0.04, 0.5)  # otherwise a step over the tile, display range fraction
    size: tuple[float, float] = (4.0, 28.0)  # object extent, display pixels (log-uniform)
    stroke: tuple[float, float] = (0.8, 4.0)  # stroke width, display pixels
    tissue_only: bool = True  # paste over tissue only (``over_tissue``); False: over air too (before v2)
    seed: int = 0


def draw_object(rng: np.random.Generator, config: PretextConfig, side: int = PATCH) -> np.ndarray:
    """Coverage (side, side) float32 0..1 of one random object near the tile's centre."""
    import cv2

    s = SUPERSAMPLE
    canvas = np.zeros((side * s, side * s), np.uint8)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    cx, cy = rng.uniform(side / 4, 3 * side / 4, 2) * s
    size = math.exp(rng.uniform(*np.log(config.size))) * s
    stroke = max(1, int(rng.uniform(*config.stroke) * s))
    angle = rng.uniform(0, 360)
    aa = cv2.LINE_AA
    if kind == "polyline":  # wires, clips, zig-zags
        n = int(rng.integers(2, 7))
        pts = [(cx, cy)]
        for _ in range(n - 1):
            a, step = rng.uniform(0, 2 * math.pi), size / n * rng.uniform(0.6, 1.6)
            pts.append((pts[-1][0] + step * math.cos(a), pts[-1][1] + step * math.sin(a)))
        cv2.polylines(canvas, [np.asarray(pts, np.int32)], False, 255, stroke, aa)
    elif kind == "arc":  # rings seen obliquely, partial rings
        axes = (max(1, int(size / 2)), max(1, int(size / 2 * rng.uniform(0.4, 1.0))))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, angle, 0, rng.uniform(120, 360), 255, stroke, aa)
    elif kind == "bar":  # cylinders, rods: a filled bar with round ends
        half = size / 2
        dx, dy = half * math.cos(math.radians(angle)), half * math.sin(math.radians(angle))
        width = max(stroke, int(rng.uniform(2, 6) * s))
        cv2.line(canvas, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 255, width, aa)
    elif kind == "cross":
        half = size / 2
        for k in range(int(rng.integers(2, 4))):
            a = math.radians(angle + k * 60 * rng.uniform(0.8, 1.2))
            cv2.line(canvas, (int(cx - half * math.cos(a)), int(cy - half * math.sin(a))),
                     (int(cx + half * math.cos(a)), int(cy + half * math.sin(a))), 255, stroke, aa)
    elif kind == "spiral":  # coils
        turns = rng.uniform(1.5, 4.0)
        t = np.linspace(0, turns * 2 * math.pi, 60)
        r = size / 2 * (0.2 + 0.8 * t / t[-1])
        coil = np.stack([cx + r * np.cos(t + angle), cy + r * np.sin(t + angle)], axis=1)
        cv2.polylines(canvas, [coil.astype(np.int32)], False, 255, stroke, aa)
    else:  # one to three small spheres
        for _ in range(int(rng.integers(1, 4))):
            centre = (int(cx + rng.normal(0, size / 3)), int(cy + rng.normal(0, size / 3)))
            cv2.circle(canvas, centre, max(s, int(rng.uniform(1.0, 3.5) * s)), 255, -1, aa)
    return cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def paste(rng: np.random.Generator, display: np.ndarray, hat: np.ndarray,
          config: PretextConfig) -> tuple[np.ndarray, np.ndarray]:
    """One object pasted into a (display, top-hat) tile pair, both uint8; returns the new pair.

    The top-hat gains what the display gained: an object a few pixels across is smaller than the
    top-hat's opening (``preprocess.TOPHAT_FRACTION``), so it sits wholly above the local background."""
    coverage = draw_object(rng, config, display.shape[0])
    d = display.astype(np.float32)
    if rng.random() < config.saturated_rate:
        new = d * (1 - coverage) + 255.0 * coverage
    else:
        new = d + rng.uniform(*config.contrast) * 255.0 * coverage
    new = np.clip(new + rng.normal(0, 1.0, new.shape) * (coverage > 0), 0, 255)
    new_hat = np.clip(hat.astype(np.float32) + (new - d), 0, 255)
    return new.astype(np.uint8), new_hat.astype(np.uint8)


def over_tissue(tiles: np.ndarray) -> np.ndarray:
    """(T,) bool: which (T, 2, P, P) uint8 (display, top-hat) tiles are centred over tissue, not air.

    The median over the central 12 x 12 of display minus top-hat: an object smaller than the top-hat's
    opening (``preprocess.TOPHAT_FRACTION``) is not in the opening, so a letter on black reads as black."""
    c, r = tiles.shape[-1] // 2, 6
    centre = tiles[:, :, c - r:c + r, c - r:c + r].astype(np.int16)
    return np.median((centre[:, 0] - centre[:, 1]).reshape(len(tiles), -1), axis=1) >= AIR_LEVEL


def tile_grid(x: np.ndarray, planes: tuple[int, int], patch: int = PATCH) -> np.ndarray:
    """(N, tiles, 2, patch, patch): the candidate tiles of a model-input batch (N, C, S, S), row by row."""
    n, _, size, _ = x.shape
    g = size // patch
    t = x[:, planes[0]:planes[1] + 1, :g * patch, :g * patch].reshape(n, 2, g, patch, g, patch)
    return t.transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, 2, patch, patch)


def blank_tiles(x: np.ndarray, planes: tuple[int, int], patch: int = PATCH) -> np.ndarray:
    """(N, tiles) bool: the tiles of a model-input batch that hold no candidate (all zero)."""
    return tile_grid(x, planes, patch).reshape(len(x), -1, 2 * patch * patch).max(axis=2) == 0


def candidate_tiles(x: np.ndarray, planes: tuple[int, int], patch: int = PATCH) -> np.ndarray:
    """(n, 2, patch, patch) uint8: every non-blank candidate tile of a model-input batch (N, C, S, S)."""
    t = tile_grid(x, planes, patch).reshape(-1, 2, patch, patch)
    return np.ascontiguousarray(t[t.reshape(len(t), -1).max(axis=1) > 0])


def best_tile_scores(tile_body, x: np.ndarray, weight: np.ndarray, bias: float, planes: tuple[int, int],
                     patch: int = PATCH, batch: int = 32) -> np.ndarray:
    """(N,) each image's best score of the detector (``weight``, ``bias``) over its non-blank tiles.

    ``tile_body`` maps a model-input batch to per-tile features (N, tiles, F) (``training.network.TileBody``)."""
    import torch

    blank = blank_tiles(x, planes, patch)
    w = torch.from_numpy(np.asarray(weight, np.float32).reshape(-1, 1))
    with torch.no_grad():
        z = np.concatenate([(tile_body(torch.from_numpy(x[i:i + batch]).float()) @ w).squeeze(-1).numpy()
                            for i in range(0, len(x), batch)]) + bias
    return np.where(blank, -np.inf, z).max(axis=1)


def pretext_batch(rng: np.random.Generator, tiles: np.ndarray, tissue: np.ndarray,
                  config: PretextConfig) -> tuple[np.ndarray, np.ndarray]:
    """One pretext batch: ``config.batch`` tiles drawn from ``tiles`` and (batch,) bool targets; about half of
    those over tissue (``tissue``, from ``over_tissue``) get an object pasted and are the targets."""
    pick = rng.integers(0, len(tiles), config.batch)
    batch = tiles[pick].copy()
    target = (rng.random(config.batch) < 0.5) & tissue[pick]
    for j in np.flatnonzero(target):
        batch[j, 0], batch[j, 1] = paste(rng, batch[j, 0], batch[j, 1], config)
    return batch, target


def pretrain_tile_body(tile_net, feature_dim: int, tiles: np.ndarray,
                       config: PretextConfig) -> tuple[np.ndarray, float]:
    """Train ``tile_net`` ((T, 2, P, P) float 0..255 -> (T, feature_dim)) on the pretext; return the
    pretext classifier's (weight (feature_dim,), bias): a foreign-object detector on those features."""
    import torch
    from torch import nn

    if len(tiles) == 0:
        raise ValueError("no candidate tiles to pretrain on")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    tissue = over_tissue(tiles) if config.tissue_only else np.ones(len(tiles), dtype=bool)
    if not tissue.any():  # no tile over tissue (a cohort of tiny or blank images): paste anywhere
        log.warning("pretext: none of %d candidate tiles lies over tissue; pasting over air too", len(tiles))
        tissue[:] = True
    head = nn.Linear(feature_dim, 1)
    opt = torch.optim.AdamW(list(tile_net.parameters()) + list(head.parameters()), lr=config.lr, weight_decay=1e-2)
    tile_net.train()
    t0, loss = time.perf_counter(), float("nan")
    for step in range(config.steps):
        batch, target = pretext_batch(rng, tiles, tissue, config)
        b = torch.from_numpy(batch).float()
        if rng.random() < 0.5:
            b = b.flip(-1)
        b = torch.rot90(b, int(rng.integers(0, 4)), (-2, -1))
        out = head(tile_net(b)).squeeze(1)
        step_loss = nn.functional.binary_cross_entropy_with_logits(out, torch.from_numpy(target.astype(np.float32)))
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        loss = float(step_loss.detach())
    log.info("pretext: %d steps of %d tiles (from %d, %d over tissue) in %.0f s, last loss %.3f", config.steps,
             config.batch, len(tiles), int(tissue.sum()), time.perf_counter() - t0, loss)
    tile_net.eval()
    return head.weight.detach().numpy()[0].copy(), float(head.bias.detach()[0])


# -- the whole-image body: how far is this view zoomed? ------------------------------------------------------
#
# A magnification view is a spot-compressed region of the breast seen at 1.5-2x: the same tissue, larger
# structures, a narrower field. From random initialisation and a few dozen labelled magnification views, the
# whole-image network learns the easiest cue the labels allow (in the shifted family: no skin line in the
# field means a magnification view) and misses the views that break it (benchmarks/results/zoom.json, shifted
# family, 350 labels: the 24 magnification views without the skin line ranked above every contact view, AUROC
# 1.00; the 11 showing it among them, 0.53; with this pretext, 0.97 and 0.77). The pretext asks the body how
# far a crop of an unlabelled image is zoomed: a random window 1/z of the image's sides, area-reduced to the
# input size like any image (from display pixels, so a zoomed crop is as sharp as a view taken at that scale,
# not an upsampled blur), and its log z regressed. Nothing in it comes from the synthetic generator: the
# scale is the archive's own tissue.

ZOOM_PRETEXT_VERSION = "zoom-v1"


@dataclass(frozen=True)
class ZoomConfig:
    steps: int = 200  # optimizer steps of ``batch`` crops
    batch: int = 32
    lr: float = 3e-3
    zoom: tuple[float, float] = (1.3, 3.0)  # crop zoom, log-uniform; each image is also seen whole (z = 1)
    crops_per_image: int = 2
    min_tissue: float = 0.5  # a zoomed window is drawn again (up to 10 times) until this share is tissue
    noise: float = 4.0  # Gaussian noise up to this display level on every crop: the noise grain is not the cue
    seed: int = 0


def zoom_crops(rng: np.random.Generator, display: np.ndarray, size: int,
               config: ZoomConfig) -> tuple[np.ndarray, np.ndarray]:
    """(1 + crops_per_image, 3, size, size) uint8 whole-image planes (``preprocess.whole_image_planes``) of the
    display and of zoomed windows of it, and their (n,) float32 log zoom (0 for the whole image)."""
    from mammoflag.preprocess import whole_image_planes

    h, w = display.shape
    planes, zooms = [whole_image_planes(display, size)], [0.0]
    for _ in range(config.crops_per_image):
        z = math.exp(rng.uniform(*np.log(config.zoom)))
        ch, cw = max(1, int(h / z)), max(1, int(w / z))
        for _ in range(10):
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            window = display[y0:y0 + ch, x0:x0 + cw]
            if (window >= AIR_LEVEL).mean() >= config.min_tissue:
                break
        planes.append(whole_image_planes(np.ascontiguousarray(window), size))
        zooms.append(math.log(h / ch))
    return np.stack(planes), np.asarray(zooms, np.float32)


def pretrain_image_body(image_net, feature_dim: int, x: np.ndarray, log_zoom: np.ndarray,
                        config: ZoomConfig) -> tuple[np.ndarray, float]:
    """Train ``image_net`` ((N, 3, S, S) float 0..255 -> (N, feature_dim)) to regress ``log_zoom`` of the crops
    ``x`` (``zoom_crops``); return the regressor's (weight (feature_dim,), bias): log zoom on those features."""
    import torch
    from torch import nn

    if len(x) == 0:
        raise ValueError("no images to pretrain on")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    head = nn.Linear(feature_dim, 1)
    opt = torch.optim.AdamW(list(image_net.parameters()) + list(head.parameters()), lr=config.lr, weight_decay=1e-2)
    image_net.train()
    t0, loss = time.perf_counter(), float("nan")
    for _ in range(config.steps):
        pick = rng.integers(0, len(x), config.batch)
        b = torch.from_numpy(x[pick]).float()
        if rng.random() < 0.5:
            b = b.flip(-1)
        if rng.random() < 0.5:
            b = b.flip(-2)
        b = (b + torch.randn_like(b) * float(rng.uniform(0, config.noise))).clamp(0, 255)
        out = head(image_net(b)).squeeze(1)
        step_loss = nn.functional.smooth_l1_loss(out, torch.from_numpy(log_zoom[pick]), beta=0.1)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        loss = float(step_loss.detach())
    log.info("zoom pretext: %d steps of %d crops (from %d) in %.0f s, last loss %.3f", config.steps, config.batch,
             len(x), time.perf_counter() - t0, loss)
    image_net.eval()
    return head.weight.detach().numpy()[0].copy(), float(head.bias.detach()[0])
