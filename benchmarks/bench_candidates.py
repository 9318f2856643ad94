"""Does the default network's tile branch get to see the marker? (issue 13 diagnostics)

    nice .venv/bin/python benchmarks/bench_candidates.py --work /tmp/mammoflag-gen

The default network scores ``biopsy_tool`` on 32 x 32 display-pixel tiles around the image's most
marker-like spots (``mammoflag.preprocess.candidates``: 64 of them at a 256 px input). A marker that
no tile covers can only be found by the whole-image branch, where a 10 px marker is ~2.5 px: so the
share of marker images with a marker inside some tile bounds what the tile branch can learn,
whatever the labels, the pretext or the head.

Reads the DATA_DIRs ``bench_generalisation.py prepare`` made under ``--work`` (their ground truth
carries each marker part's box: ``importers.synthetic.marker_boxes``) and, for every biopsy-positive
image, asks whether a candidate tile covers the centre of some marker part, at 16 / 32 / 64 / 128
candidates, overall and by marker size, contrast, edge cut, dense background, metal and shape. Also
the rank of the first covering candidate. Results: ``benchmarks/results/candidates.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

KS = (16, 32, 64, 128)


def covered_rank(centres: np.ndarray, boxes: list[tuple[float, float, float, float]], patch: int) -> int | None:
    """The rank (0 = strongest) of the first candidate whose tile holds the centre of some marker part."""
    half = patch / 2
    for rank, (y, x) in enumerate(centres):
        for r0, c0, r1, c1 in boxes:
            cy, cx = (r0 + r1) / 2, (c0 + c1) / 2
            if y - half <= cy < y + half and x - half <= cx < x + half:
                return rank
    return None


def strata(truth: dict[str, str]) -> dict[str, str]:
    size = float(truth["marker_size_frac"] or 0)
    contrast = float(truth["marker_contrast"] or 0)
    return {
        "size": "<1.2%" if size < 0.012 else "1.2-2%" if size < 0.02 else ">=2%",
        "contrast": "<0.05" if contrast < 0.05 else "0.05-0.15" if contrast < 0.15 else ">=0.15",
        "cut_by_edge": truth["marker_cut_by_edge"] or "?",
        "in_dense": truth["marker_in_dense"] or "?",
        "metal": truth["marker_metal"] or "?",
        "shape": (truth["marker_shapes"] or "?").split(";")[0],
    }


def measure(data_dir: Path, input_size: int) -> dict:
    from importers.synthetic import read_ground_truth, read_marker_boxes
    from ls_helpers import truth_by_key
    from mammoflag.preprocess import PATCH, candidates, load_display_image, tophat

    truth = truth_by_key(read_ground_truth(data_dir / "ground_truth.csv"))
    rows = list(csv.DictReader(open(data_dir / "manifest.csv", newline="")))
    k_default = (input_size // PATCH) ** 2
    ranks: list[int | None] = []
    by: dict[str, dict[str, list[int | None]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        t = truth[row["key"]]
        if t["biopsy_tool"] != "1":
            continue
        display = load_display_image(data_dir / row["image"])
        stored_rows, stored_cols = (int(v) for v in t["detector"].split("x"))
        sy, sx = display.shape[0] / stored_rows, display.shape[1] / stored_cols
        boxes = [(r0 * sy, c0 * sx, r1 * sy, c1 * sx) for r0, c0, r1, c1 in read_marker_boxes(t["marker_boxes"])]
        rank = covered_rank(candidates(tophat(display), max(KS)), boxes, PATCH)
        ranks.append(rank)
        for name, value in strata(t).items():
            by[name][value].append(rank)

    def recall(rs: list[int | None]) -> dict:
        out = {f"at_{k}": round(float(np.mean([r is not None and r < k for r in rs])), 3) for k in KS}
        return {"n": len(rs), **out}

    hit = [r for r in ranks if r is not None and r < k_default]
    return {
        "positives": len(ranks), "default_candidates": k_default, "recall": recall(ranks),
        "median_rank_when_covered": float(np.median(hit)) if hit else None,
        "by": {name: {v: recall(rs) for v, rs in sorted(vals.items())} for name, vals in by.items()},
    }


def main() -> None:
    from results_file import merge_results
    from mammoflag.spec import DEFAULT_INPUT_SIZE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--families", default="standard,shifted")
    ap.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "candidates.json")
    args = ap.parse_args()
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    for family in args.families.split(","):
        for role in ("pool", "test"):
            data_dir = args.work / "data" / f"{family}-{role}"
            result = measure(data_dir, args.input_size)
            print(f"{family}-{role}: {result['positives']} marker images, tile recall "
                  + ", ".join(f"{k} {v}" for k, v in result["recall"].items() if k != "n"), flush=True)
            for name, vals in result["by"].items():
                print(f"  {name}: " + "; ".join(f"{v} n={r['n']} @64 {r['at_64']}" for v, r in vals.items()))
            merge_results(f"{family}-{role}", result, args.results, machine)


if __name__ == "__main__":
    main()
