"""Tiny numpy-drawn display images for training tests (no DICOM needed).

A display image is a grey breast-like ellipse on black. ``biopsy_tool`` adds a small very
bright marker (a clip) at a random place inside the breast; ``mag_view`` fills the whole
frame with coarse tissue (a magnified spot view has no black background).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mammoflag.paths import task_url_for


def draw_display(rng: np.random.Generator, biopsy_tool: bool, mag_view: bool, shape=(160, 128)) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    if mag_view:
        noise = rng.normal(0, 1, (h // 16 + 2, w // 16 + 2))
        tissue = np.kron(noise, np.ones((16, 16)))[:h, :w]
        img = 120 + 30 * tissue
    else:
        cy, cx = h / 2 + rng.uniform(-8, 8), rng.uniform(-4, 4)
        inside = ((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.85 * w)) ** 2 < 1
        noise = rng.normal(0, 1, (h // 8 + 2, w // 8 + 2))
        tissue = np.kron(noise, np.ones((8, 8)))[:h, :w]
        img = np.where(inside, 100 + 25 * tissue, 0)
    img = img + rng.normal(0, 6, (h, w))
    if biopsy_tool:
        my, mx = int(rng.uniform(0.3, 0.7) * h), int(rng.uniform(0.1, 0.5) * w)
        length, thick = int(rng.integers(10, 18)), int(rng.integers(3, 5))
        if rng.random() < 0.5:
            img[my:my + thick, mx:mx + length] = 255
        else:
            img[my:my + length, mx:mx + thick] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


def write_labelled_pngs(root: Path, data_root: Path, n: int, seed: int = 0, patients: int | None = None):
    """n PNGs under root plus Label Studio task dicts (data + one annotation each) and truth rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(n):
        biopsy, mag = bool(rng.random() < 0.4), bool(rng.random() < 0.35)
        path = root / f"img{i:04d}.png"
        Image.fromarray(draw_display(rng, biopsy, mag)).save(path)
        choices = [c for c, on in (("biopsy_tool", biopsy), ("mag_view", mag)) if on] or ["neither"]
        patient = f"p{i % patients}" if patients else f"p{i}"
        tasks.append({
            "id": i + 1,
            "data": {"image": task_url_for(path, data_root), "key": f"1.2.3.{seed}.{i}:0", "patient_key": patient,
                     "study_instance_uid": f"1.2.3.{seed}.{i}"},
            "annotations": [{"id": i + 1, "completed_by": 1, "was_cancelled": False,
                             "result": [{"from_name": "findings", "to_name": "image", "type": "choices",
                                         "value": {"choices": choices}}]}],
            "truth": {"biopsy_tool": int(biopsy), "mag_view": int(mag)},
        })
    return tasks


def write_export(tasks, path: Path) -> Path:
    path.write_text(json.dumps([{k: v for k, v in t.items() if k != "truth"} for t in tasks]))
    return path
