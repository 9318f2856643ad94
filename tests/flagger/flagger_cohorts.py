"""A known synthetic cohort for the flagger, and a straightforward reference to check it against.

The tiny test model (tests/factories.py) answers to the brightest pixel: its logit is
``sum_c((v/255 - mean_c) / std_c) - 2`` for a brightest value ``v``. Each image gets a
bright square of a chosen value, so which class it should raise is known by
construction:

    v = 0 or 110 -> nothing;   v = 180 -> biopsy_tool only;   v = 245 -> biopsy_tool and mag_view

with thresholds biopsy_tool 0.5 (v >= 153) and mag_view 0.9 at temperature 1.3 (v >= 208).
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from mammoflag.spec import ModelSpec

MANIFEST_COLUMNS = ["key", "image", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame",
                    "patient_key", "view_position", "laterality", "view_modifiers", "image_type",
                    "presentation_intent", "manufacturer", "model", "burned_in_annotation", "voi", "rows", "cols"]
NOTHING, FAINT, BIOPSY, BOTH = 0, 110, 180, 245
THRESHOLDS = {"biopsy_tool": 0.5, "mag_view": 0.9}
TEMPERATURES = {"biopsy_tool": 1.0, "mag_view": 1.3}
MANUFACTURERS = ("HOLOGIC, Inc.", "GE MEDICAL SYSTEMS", "FUJIFILM Corporation")
VIEWS = (("CC", "L"), ("MLO", "L"), ("CC", "R"), ("MLO", "R"))

# Study layout of the known cohort: one list of spot values per study.
KNOWN_STUDIES = [
    [NOTHING, NOTHING, NOTHING, NOTHING],
    [NOTHING, BIOPSY, NOTHING, NOTHING],
    [FAINT, NOTHING, BOTH],
    [BOTH, BOTH],
    [FAINT, FAINT, FAINT],
    [NOTHING, NOTHING, BIOPSY, NOTHING],
    [BOTH],
    [NOTHING, FAINT],
]


def uid(*parts: object) -> str:
    return "2.25." + str(int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24], 16))


def write_display_cohort(data_dir: Path, studies: list[list[int]], size: tuple[int, int] = (160, 128),
                         seed: int = 0, tissue_max: tuple[int, int] = (50, 50)) -> Path:
    """An import DATA_DIR (docs/CONTRACTS.md layout) with one display PNG per listed spot value; each image's
    "tissue" is noise from 0 up to a value drawn from ``tissue_max`` (a site's look)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, spots in enumerate(studies):
        study_uid = uid(seed, "study", s)
        for i, spot in enumerate(spots):
            sop = uid(seed, "image", s, i)
            h, w = size
            top = tissue_max[0] if tissue_max[0] == tissue_max[1] else int(rng.integers(*tissue_max))
            img = rng.integers(0, top, size=(h, w), dtype=np.uint8)  # dim "tissue"
            if spot:
                y, x = int(rng.integers(10, h - 30)), int(rng.integers(10, w - 30))
                img[y : y + 18, x : x + 18] = spot
            rel = Path("images") / sop / "0.png"
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(data_dir / rel)
            view, lat = VIEWS[i % len(VIEWS)]
            rows.append({
                "key": f"{sop}:0", "image": rel.as_posix(), "sop_instance_uid": sop, "study_instance_uid": study_uid,
                "series_instance_uid": uid(seed, "series", s), "frame": "0", "patient_key": f"pk{s:04d}",
                "view_position": view, "laterality": lat,
                "view_modifiers": "magnification" if spot == BOTH and i % 2 == 0 else "",
                "image_type": "ORIGINAL|PRIMARY", "presentation_intent": "FOR PRESENTATION",
                "manufacturer": MANUFACTURERS[s % len(MANUFACTURERS)], "model": "X", "burned_in_annotation": "NO",
                "voi": "window:LINEAR", "rows": str(h), "cols": str(w),
            })
    with open(data_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return data_dir


def expected_classes(spot: int) -> tuple[int, int]:
    return int(spot >= BIOPSY), int(spot >= BOTH)


def reference_study_flags(data_dir: Path, model_onnx: Path, spec: ModelSpec,
                          human: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """The straightforward computation: one image at a time through ONNX Runtime, threshold, any image flags."""
    import onnxruntime as ort

    from mammoflag.preprocess import load_display_image, model_input

    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    study_flags: dict[str, list[int]] = defaultdict(lambda: [0] * len(spec.classes))
    with open(data_dir / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = data_dir / row["image"]
            if not row["study_instance_uid"] or not path.exists():
                continue
            try:
                display = load_display_image(path)
            except OSError:
                continue
            logits = session.run(None, {name: model_input(display, spec.input_size)[None].astype(np.float32)})[0][0]
            flags = study_flags[row["study_instance_uid"]]
            for c, cls in enumerate(spec.classes):
                if human and row["key"] in human:
                    raised = human[row["key"]][c] == 1
                else:
                    p = 1 / (1 + math.exp(-float(logits[c]) / spec.temperatures[cls]))
                    raised = p >= spec.thresholds[cls]
                flags[c] = max(flags[c], int(raised))
    return {k: tuple(v) for k, v in study_flags.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
