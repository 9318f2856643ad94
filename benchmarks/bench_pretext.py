"""How well does the tile pretext's detector alone rank biopsy images, by pretext variant? (issue 13 diagnostics)

    nice .venv/bin/python benchmarks/bench_pretext.py --work /tmp/mammoflag-gen \
        [--train shifted] [--variants everywhere,tissue,tissue-800] [--seeds 0,1]

Reads the cohorts ``bench_generalisation.py prepare`` made under ``--work``. For each variant and seed
it takes the images of 350 labels (whole studies, as ``bench_generalisation.pick_labels``) of the
``--train`` family's pool, pretrains the default network's tile body on the pretext exactly as
``mammoflag train`` does (``training.pretext.pretrain_tile_body``), and scores ``biopsy_tool`` on every
test cohort under ``--work`` (each family's ``*-test``) with the pretext's own detector, no labels: an
image's score is its best candidate tile's. That is where a class declared an object starts
(``training.train._pretext_start``), and so far the ceiling of what labels add on top (``bench_tile_heads.py``).

Variants (``PretextConfig`` fields):

- ``everywhere``: objects pasted on any candidate tile (the pretext before ``paste-objects-v2-tissue``);
- ``tissue``: pasted only on tiles over tissue (``training.pretext.over_tissue``), the default;
- ``tissue-800`` / ``tissue-1200``: the same with 800 / 1200 steps instead of 400.

Results: ``benchmarks/results/pretext.json``, one key per train family and variant: AUROC per seed and
test family, their mean, the pretext's wall time, and the load average.
"""

from __future__ import annotations

import argparse
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
from bench_tile_heads import best, cohort_inputs, tile_features  # noqa: E402
from results_file import merge_results  # noqa: E402

VARIANTS: dict[str, dict] = {
    "everywhere": {"tissue_only": False},
    "tissue": {"tissue_only": True},
    "tissue-800": {"tissue_only": True, "steps": 800},
    "tissue-1200": {"tissue_only": True, "steps": 1200},
}


def run(work: Path, train_family: str, variant: str, seeds: list[int], labels: int) -> dict:
    import torch

    from mammoflag.spec import DEFAULT_INPUT_SIZE
    from training.calibrate import auroc
    from training.network import TILE_CHANNELS, build_network, feature_size
    from training.pretext import PretextConfig, candidate_tiles, pretrain_tile_body

    torch.set_num_threads(2)
    pool = work / "data" / f"{train_family}-pool"
    x_all, _, study = cohort_inputs(pool, DEFAULT_INPUT_SIZE)
    export = json.loads((pool / "export.json").read_text())
    tests = {d.name.removesuffix("-test"): cohort_inputs(d, DEFAULT_INPUT_SIZE)
             for d in sorted((work / "data").glob("*-test"))}
    planes = (TILE_CHANNELS[0], TILE_CHANNELS[-1])
    per_seed = []
    for seed in seeds:
        chosen = {t["data"]["study_instance_uid"] for t in pick_labels(export, labels, seed)}
        x = x_all[np.isin(study, sorted(chosen))]
        torch.manual_seed(seed)
        body = build_network("markerpatch", 2)[0].tiles
        dim = feature_size("markerpatch", 1) - feature_size("markerpatch", 0)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        w, b = pretrain_tile_body(body.net, dim, candidate_tiles(x, planes, body.patch),
                                  PretextConfig(seed=seed, **VARIANTS[variant]))
        row: dict = {"seed": seed, "images": int(len(x)), "pretext_s": round(time.perf_counter() - t0, 1),
                     "load_before": round(load, 2), "auroc": {}}
        body.eval()
        for family, (xt, yt, _) in tests.items():
            f, blank = tile_features(body, xt, planes)
            row["auroc"][family] = round(float(auroc(best(f @ w + b, blank), yt)), 3)
        print(variant, row, flush=True)
        per_seed.append(row)
    return {"train_family": train_family, "variant": variant, "config": VARIANTS[variant], "labels": labels,
            "seeds": per_seed,
            "mean_auroc": {f: round(float(np.mean([r["auroc"][f] for r in per_seed])), 3) for f in tests},
            "mean_over_families": round(float(np.mean([v for r in per_seed for v in r["auroc"].values()])), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--train", default="shifted")
    ap.add_argument("--variants", default="everywhere,tissue,tissue-800")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--labels", type=int, default=350)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "pretext.json")
    a = ap.parse_args()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    for variant in a.variants.split(","):
        result = run(a.work, a.train, variant, [int(s) for s in a.seeds.split(",")], a.labels)
        print(json.dumps({k: result[k] for k in ("variant", "mean_auroc", "mean_over_families")}), flush=True)
        merge_results(f"{a.train}: {variant}", result, a.results, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
