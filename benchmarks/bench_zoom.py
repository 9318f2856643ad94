"""Does the zoom pretext tell magnification views, with no labels, the skin-line ones too? (issue 13 diagnostics)

    nice .venv/bin/python benchmarks/bench_zoom.py --work /tmp/mammoflag-gen [--train shifted] [--seeds 0,1] \
        [--logits /tmp/mammoflag-gen/logits/shifted-shifted_350_s0.npz --logits-label v1-no-zoom]

Reads the cohorts ``bench_generalisation.py prepare`` made under ``--work``. For each seed it takes the
images of 350 labels (whole studies, ``bench_generalisation.pick_labels``) of the ``--train`` family's
pool, pretrains the default network's whole-image body on the zoom pretext exactly as ``mammoflag train``
does (``training.pretext.zoom_crops`` / ``pretrain_image_body``, ``ZoomConfig`` defaults) and scores
``mag_view`` on every test cohort under ``--work`` by the predicted zoom alone, no labels: AUROC over all
images, and over the contact views against the magnification views that show the skin line (``air``
among the ground truth's artefacts) and against those that do not.

``--logits`` (a ``bench_generalisation.py run`` dump, repeatable) adds the same split for a *trained*
model's mag_view logits on its test cohort: where a model that learned from the labels alone stands.

Results: ``benchmarks/results/zoom.json`` (one key per train family and seed; one per logits file).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from bench_generalisation import pick_labels  # noqa: E402
from results_file import merge_results  # noqa: E402

CLASS = "mag_view"


def _truth(data_dir: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(manifest rows, mag_view truth, shows the skin line) of an imported DATA_DIR."""
    from importers.synthetic import read_ground_truth
    from ls_helpers import truth_by_key

    rows = list(csv.DictReader(open(data_dir / "manifest.csv", newline="")))
    truth = truth_by_key(read_ground_truth(data_dir / "ground_truth.csv"))
    y = np.array([int(truth[r["key"]][CLASS]) for r in rows])
    air = np.array(["air" in truth[r["key"]].get("artefacts", "").split(";") for r in rows])
    return rows, y, air


def split_auroc(score: np.ndarray, y: np.ndarray, air: np.ndarray) -> dict:
    from training.calibrate import auroc

    contact = y == 0
    skin, no_skin = (y == 1) & air, (y == 1) & ~air
    r = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
    return {"all": r(auroc(score, y)),
            "skin_line_mag_vs_contact": r(auroc(score[contact | skin], y[contact | skin])),
            "no_skin_line_mag_vs_contact": r(auroc(score[contact | no_skin], y[contact | no_skin])),
            "mag_with_skin_line": int(skin.sum()), "mag_without": int(no_skin.sum()), "contact": int(contact.sum()),
            "contact_median": r(np.median(score[contact])), "contact_p90": r(np.quantile(score[contact], 0.9)),
            "skin_line_mag_range": [r(score[skin].min()), r(score[skin].max())] if skin.any() else None,
            "no_skin_line_mag_range": [r(score[no_skin].min()), r(score[no_skin].max())] if no_skin.any() else None}


def run(work: Path, train_family: str, seed: int, labels: int) -> dict:
    import torch

    from mammoflag.preprocess import load_display_image, model_input
    from mammoflag.spec import DEFAULT_INPUT_SIZE
    from training.network import build_network, feature_size
    from training.pretext import ZoomConfig, pretrain_image_body, zoom_crops

    torch.set_num_threads(2)
    size = DEFAULT_INPUT_SIZE
    pool = work / "data" / f"{train_family}-pool"
    export = json.loads((pool / "export.json").read_text())
    chosen = {t["data"]["study_instance_uid"] for t in pick_labels(export, labels, seed)}
    rows = [r for r in csv.DictReader(open(pool / "manifest.csv", newline="")) if r["study_instance_uid"] in chosen]
    config = ZoomConfig(seed=seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    body = build_network("markerpatch", 2)[0].image
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    crops = [zoom_crops(rng, load_display_image(pool / r["image"]), size, config) for r in rows]
    crops_s = time.perf_counter() - t0
    w, b = pretrain_image_body(body, feature_size("markerpatch", 0), np.concatenate([c for c, _ in crops]),
                               np.concatenate([z for _, z in crops]), config)
    out: dict = {"train_family": train_family, "seed": seed, "images": len(rows), "config": config.__dict__,
                 "crops_s": round(crops_s, 1), "pretext_s": round(time.perf_counter() - t0, 1),
                 "load_before": round(load, 2), "predicted_zoom_auroc": {}}
    body.eval()
    for test in sorted((work / "data").glob("*-test")):
        test_rows, y, air = _truth(test)
        x = np.stack([model_input(load_display_image(test / r["image"]), size)[:3] for r in test_rows])
        with torch.no_grad():
            z = np.concatenate([body(torch.from_numpy(x[i:i + 32]).float()).numpy() @ w
                                for i in range(0, len(x), 32)]) + b
        out["predicted_zoom_auroc"][test.name.removesuffix("-test")] = split_auroc(z, y, air)
    return out


def logits_split(npz: Path, work: Path) -> dict:
    d = np.load(npz, allow_pickle=False)
    k = [str(c) for c in d["classes"]].index(CLASS)
    z = d["test_logits"][:, k]
    for test in sorted((work / "data").glob("*-test")):  # the dump holds no path: find its cohort by its truth
        rows, y, air = _truth(test)
        if len(rows) == len(z) and np.array_equal(y, d["test_y"][:, k]):
            return {"test_cohort": test.name, "trained_model_logit": split_auroc(z, y, air)}
    raise SystemExit(f"{npz}: no test cohort under {work} matches its targets")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--train", default="shifted")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--labels", type=int, default=350)
    ap.add_argument("--logits", type=Path, action="append", default=[])
    ap.add_argument("--logits-label", action="append", default=[], help="a name per --logits (what model it was)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "zoom.json")
    a = ap.parse_args()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    for i, npz in enumerate(a.logits):
        label = a.logits_label[i] if i < len(a.logits_label) else npz.stem
        result = logits_split(npz, a.work)
        print(label, json.dumps(result), flush=True)
        merge_results(f"logits: {label}", result, a.results, machine)
    for seed in [int(s) for s in a.seeds.split(",") if s]:
        result = run(a.work, a.train, seed, a.labels)
        print(json.dumps(result, indent=1), flush=True)
        merge_results(f"{a.train}: seed {seed}", result, a.results, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
