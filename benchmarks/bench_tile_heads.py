"""Which tile head gets most out of the pretext's frozen tile features? (issue 13 diagnostics)

    nice .venv/bin/python benchmarks/bench_tile_heads.py --work /tmp/mammoflag-gen [--train standard --test shifted]

Reads the cohorts ``bench_generalisation.py prepare`` made under ``--work``, takes the same 350 labels
(whole studies, seed 0) of the training family, pretrains the default network's tile body on the
pretext exactly as ``mammoflag train`` does (``training.pretext``, 400 steps, seed 0), freezes it,
and scores biopsy_tool on the *test* family's images with heads fitted on those features:

- ``pretext_detector``: the pretext's own foreign-object classifier, no labels (what a class
  starts from in ``training.train._pretext_start``);
- ``mil_logistic``: a linear tile classifier fitted on the image labels, log-sum-exp pooling
  (the default network's head, alone);
- ``negative_bank_knn``: a tile's novelty = 1 - its best cosine similarity to any tile of a
  label-negative training image (PatchCore-style); the image's score is its most novel tile;
- ``object_novelty``: the same, but only among the detector's top tiles of each image, against
  the top tiles of negative images (is this object one the negatives also show?);
- ``pseudo_instances``: the most novel tile of each positive training image against every tile of
  the negative ones, a plain logistic (mi-SVM style);
- ``pasted_vs_negatives``: pasted pretext objects against every tile of label-negative images (the
  labels teach only what a marker is *not*).

The image score is the best tile's; AUROC over the test family's images. Results:
benchmarks/results/tile_heads.json (one key per train -> test pair, with the load).
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

from bench_generalisation import pick_labels  # noqa: E402
from results_file import merge_results  # noqa: E402

CLASS = "biopsy_tool"


def cohort_inputs(data_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model inputs, biopsy_tool truth, study uid) of every image of an imported DATA_DIR."""
    from importers.synthetic import read_ground_truth
    from ls_helpers import truth_by_key
    from mammoflag.preprocess import load_display_image, model_input

    rows = list(csv.DictReader(open(data_dir / "manifest.csv", newline="")))
    truth = truth_by_key(read_ground_truth(data_dir / "ground_truth.csv"))
    x = np.stack([model_input(load_display_image(data_dir / r["image"]), size) for r in rows])
    y = np.array([int(truth[r["key"]][CLASS]) for r in rows])
    return x, y, np.array([r["study_instance_uid"] for r in rows])


def tile_features(tile_body, x: np.ndarray, planes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from training.pretext import blank_tiles

    with torch.no_grad():
        f = np.concatenate([tile_body(torch.from_numpy(x[i:i + 32]).float()).numpy() for i in range(0, len(x), 32)])
    return f, blank_tiles(x, planes)


def best(scores: np.ndarray, blank: np.ndarray) -> np.ndarray:
    return np.where(blank, -np.inf, scores).max(axis=1)


def unit(f: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    g = (f - mu) / sd
    return g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-6)


def novelty(tiles: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """1 - best cosine similarity to the bank, for (..., D) unit vectors."""
    flat = tiles.reshape(-1, tiles.shape[-1])
    out = np.concatenate([1 - (flat[i:i + 2048] @ bank.T).max(axis=1) for i in range(0, len(flat), 2048)])
    return out.reshape(tiles.shape[:-1])


def logistic(pos: np.ndarray, neg: np.ndarray, mu: np.ndarray, sd: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression (L-BFGS) on standardised features; returns raw-feature (w, b)."""
    import torch

    x = torch.from_numpy((np.concatenate([pos, neg]) - mu) / sd).float()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    weight = torch.cat([torch.full((len(pos),), len(neg) / max(1, len(pos))), torch.ones(len(neg))])
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * weight).mean()
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    wr = w.detach().numpy() / sd
    return wr, float(b.detach()[0]) - float(wr @ mu)


def mil_logistic(f: np.ndarray, blank: np.ndarray, y: np.ndarray, mu: np.ndarray, sd: np.ndarray,
                 sharpness: float = 4.0) -> tuple[np.ndarray, float]:
    import torch

    x = torch.from_numpy((f - mu) / sd).float()
    mask, target = torch.from_numpy(blank), torch.from_numpy(y.astype(np.float32))
    w = torch.zeros(f.shape[-1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        z = (x @ w + b).masked_fill(mask, -1e4)
        pooled = torch.logsumexp(z * sharpness, dim=1) / sharpness
        loss = torch.nn.functional.binary_cross_entropy_with_logits(pooled, target) + 1e-2 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    wr = w.detach().numpy() / sd
    return wr, float(b.detach()[0]) - float(wr @ mu)


def run(work: Path, train_family: str, test_family: str, labels: int, seed: int) -> dict:
    import torch

    from mammoflag.spec import DEFAULT_INPUT_SIZE
    from training.calibrate import auroc
    from training.network import TILE_CHANNELS, build_network, feature_size
    from training.pretext import PretextConfig, candidate_tiles, paste, pretrain_tile_body

    torch.set_num_threads(2)
    pool_dir, test_dir = work / "data" / f"{train_family}-pool", work / "data" / f"{test_family}-test"
    x_all, y_all, study = cohort_inputs(pool_dir, DEFAULT_INPUT_SIZE)
    export = json.loads((pool_dir / "export.json").read_text())
    chosen = {t["data"]["study_instance_uid"] for t in pick_labels(export, labels, seed)}
    keep = np.isin(study, sorted(chosen))
    x, y = x_all[keep], y_all[keep]
    xt, yt, _ = cohort_inputs(test_dir, DEFAULT_INPUT_SIZE)
    planes = (TILE_CHANNELS[0], TILE_CHANNELS[-1])

    body = build_network("markerpatch", 2)[0].tiles
    dim = feature_size("markerpatch", 1) - feature_size("markerpatch", 0)
    t0 = time.perf_counter()
    tiles = candidate_tiles(x, planes, body.patch)
    w0, b0 = pretrain_tile_body(body.net, dim, tiles, PretextConfig(seed=seed))
    pretext_s = time.perf_counter() - t0
    body.eval()
    f, blank = tile_features(body, x, planes)
    ft, blank_t = tile_features(body, xt, planes)

    out: dict = {"train_family": train_family, "test_family": test_family, "labels": int(len(y)),
                 "train_positives": int(y.sum()), "test_images": int(len(yt)), "test_positives": int(yt.sum()),
                 "pretext_s": round(pretext_s, 1), "load_before": os.getloadavg(), "test_auroc": {}}
    score = out["test_auroc"]
    score["pretext_detector"] = auroc(best(ft @ w0 + b0, blank_t), yt)
    neg = y == 0
    neg_tiles = f[neg][~blank[neg]]
    mu, sd = neg_tiles.mean(0), neg_tiles.std(0) + 1e-6
    w, b = mil_logistic(f, blank, y, mu, sd)
    score["mil_logistic"] = auroc(best(ft @ w + b, blank_t), yt)

    u, ut = unit(f, mu, sd), unit(ft, mu, sd)
    bank = u[neg][~blank[neg]]
    score["negative_bank_knn"] = auroc(best(novelty(ut, bank), blank_t), yt)
    det, det_t = np.where(blank, -np.inf, f @ w0 + b0), np.where(blank_t, -np.inf, ft @ w0 + b0)
    top, top_t = np.argsort(-det, axis=1)[:, :8], np.argsort(-det_t, axis=1)[:, :4]
    object_bank = np.concatenate([u[i][top[i]] for i in np.flatnonzero(neg)])
    score["object_novelty"] = auroc(np.array([novelty(ut[i][top_t[i]], object_bank).max() for i in range(len(ut))]),
                                    yt)
    most_novel = novelty(u, bank)
    most_novel[blank] = -np.inf
    pseudo = np.stack([f[i][int(np.argmax(most_novel[i]))] for i in np.flatnonzero(~neg)])
    w, b = logistic(pseudo, neg_tiles, mu, sd, 1e-2)
    score["pseudo_instances"] = auroc(best(ft @ w + b, blank_t), yt)

    rng = np.random.default_rng(seed + 1)
    config = PretextConfig(seed=seed)
    pasted = tiles[rng.integers(0, len(tiles), 6000)].copy()
    for j in range(len(pasted)):
        pasted[j, 0], pasted[j, 1] = paste(rng, pasted[j, 0], pasted[j, 1], config)
    with torch.no_grad():
        f_pasted = np.concatenate([body.net(torch.from_numpy(pasted[i:i + 512]).float()).numpy()
                                   for i in range(0, len(pasted), 512)])
    w, b = logistic(f_pasted, neg_tiles, mu, sd, 1e-2)
    score["pasted_vs_negatives"] = auroc(best(ft @ w + b, blank_t), yt)
    out["test_auroc"] = {k: None if v is None else round(float(v), 3) for k, v in score.items()}
    out["load_after"] = os.getloadavg()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--train", default="standard")
    ap.add_argument("--test", default="shifted")
    ap.add_argument("--labels", type=int, default=350)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    result = run(a.work, a.train, a.test, a.labels, a.seed)
    print(json.dumps(result, indent=1))
    merge_results(f"{a.train} -> {a.test}, {a.labels} labels, seed {a.seed}", result,
                  REPO / "benchmarks" / "results" / "tile_heads.json",
                  {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
