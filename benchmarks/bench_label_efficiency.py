"""Label efficiency: metrics against the number of labels, for the platform's order and for random.

    nice .venv/bin/python benchmarks/bench_generalisation.py prepare --work /tmp/mammoflag-gen   # cohorts
    nice .venv/bin/python benchmarks/bench_label_efficiency.py --work /tmp/mammoflag-gen \
        --family shifted --budgets 50,100,200,350,500 --orders random,platform,stratified --seeds 0,1,2 \
        --pool-studies 300 --results benchmarks/results/label_efficiency_archive.json
    # results: benchmarks/results/label_efficiency.json and label_efficiency.png

The cohort is a generator family the defaults were *not* tuned on (``shifted``; the network and
its knobs were chosen on ``standard``): its pool (130 studies) is what annotators label, its test
cohort (100 other studies) is only flagged. Orders, as a session of annotators would produce them:

- ``random``: whole studies in a random order (Label Studio's uniform sampling, study by study).
- ``platform``: the platform's own: before any model the queue serves the pool in the typical/diverse
  order of ``ml_backend.typical`` (``ml_backend.setup_project.order_cold_start``: TypiClust's idea on
  appearance thumbnails), every later round takes the least certain images under the model trained on
  the labels so far (``mammoflag.inference.uncertainty_score``, near-duplicates and studies
  interleaved by ``ml_backend.diversity.diversified_scores``), as the queue serves them.
- ``stratified``: the first round is the head of the pool's stratified cold-start sample
  (``ml_backend.pool.plan_cold_start``: manufacturer, model, view and laterality take turns, studies
  interleaved), then the platform's uncertainty order. (Before the typical order existed the queue drew
  the first round at random from the pool; this order is what a pool bound of 50 would have held.)
- ``uncertainty``: a random first round, then the platform's uncertainty order (what the cold start adds).

Each budget trains one version with every default of ``training.train.train_version`` (random
initialisation, the pretext start; each order and seed's pretext is trained on that order's first
round and reused by its later rounds, as a project's registry does) and scores the test cohort as
the flagger does (study flagged when any image is). Budget 500 needs a pool larger than this
cohort's ~390 images (it is left out unless the pool has it): ``--pool-studies 300`` labels from a
pool of its own, 300 studies of the family (~900 images), so that at every budget the orders choose
among more images than they take.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "benchmarks" / "results" / "label_efficiency.json"
PRETEXT_PER_ORDER = "per-order"  # results' mark: every order's pretext trained on its own first round
# results' mark of the training they measured: runs made under another are not resumed (2026-12-03: the tile
# start follows the label config's declared kinds, and the fit is reseeded after the pretext; 2026-12-04: the
# tile pretext pastes over tissue only, and the whole-image body starts from the zoom pretext, frozen)
TRAINING_MARK = "tissue-pretext-zoom-frozen"
ARCHIVE_SEED = 4031  # the larger pool's studies share no seed with bench_generalisation's cohorts (31 + offsets)


def _studies(export: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for task in export:
        by.setdefault(task["data"]["study_instance_uid"], []).append(task)
    return by


def random_round(export: list[dict], chosen: set[str], n: int, rng: np.random.Generator) -> list[str]:
    """Whole unlabelled studies in random order until ``n`` more images."""
    by = _studies([t for t in export if t["data"]["key"] not in chosen])
    order = list(by)
    rng.shuffle(order)
    out: list[str] = []
    for s in order:
        if len(out) >= n:
            break
        out.extend(t["data"]["key"] for t in by[s][: n - len(out)])
    return out


def cold_start_round(export: list[dict], n: int) -> list[str]:
    from ml_backend.pool import plan_cold_start

    rows = [{"key": t["data"]["key"], "study_instance_uid": t["data"]["study_instance_uid"],
             "manufacturer": t["data"].get("manufacturer", ""), "model": t["data"].get("model", ""),
             "view_position": t["data"].get("view_position", ""), "laterality": t["data"].get("laterality", "")}
            for t in export]
    return plan_cold_start(rows, n)


def typical_round(export: list[dict], n: int, data_root: Path, size: int) -> list[str]:
    """The first ``n`` images of the platform's order before any model (``ml_backend.setup_project.
    order_cold_start``: ``ml_backend.typical`` on the area plane of each model input) over the pool."""
    from mammoflag.preprocess import letterbox, load_display_image
    from ml_backend.typical import appearance, typical_diverse_order

    embeddings = np.stack([appearance(letterbox(load_display_image(_image_path(t, data_root)), size)) for t in export])
    return [export[i]["data"]["key"] for i in typical_diverse_order(embeddings)[:n]]


def uncertain_round(export: list[dict], chosen: set[str], n: int, version, data_root: Path) -> list[str]:
    """The ``n`` unlabelled images the queue would serve first under ``version``."""
    from mammoflag.header_evidence import header_matrix
    from mammoflag.inference import OnnxClassifier, uncertainty_score
    from mammoflag.preprocess import load_display_image
    from ml_backend.diversity import RankedItem, average_hash, diversified_scores

    rest = [t for t in export if t["data"]["key"] not in chosen]
    clf = OnnxClassifier(version, prefer_int8=True)
    items, keys = [], []
    for i in range(0, len(rest), 32):
        batch = rest[i:i + 32]
        displays = [load_display_image(_image_path(t, data_root)) for t in batch]
        conf = uncertainty_score(clf.probabilities_for_displays(displays, header_matrix(t["data"] for t in batch)))
        for t, d, c in zip(batch, displays, conf):
            items.append(RankedItem(float(c), t["data"]["study_instance_uid"], average_hash(d)))
            keys.append(t["data"]["key"])
    scores = diversified_scores(items)
    return [keys[i] for i in np.argsort(scores, kind="stable")[:n]]


def _image_path(task: dict, data_root: Path) -> Path:
    from training.dataset import resolve_task_image

    return resolve_task_image(task["data"]["image"], data_root)


def train_on(export: list[dict], keys: list[str], run_dir: Path, pretext_dir: Path, seed: int, data_root: Path):
    from mammoflag.registry import Registry
    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec
    from training.dataset import labelled_set_from_export
    from training.train import TrainConfig, train_version

    want = set(keys)
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "models").mkdir(parents=True)
    (run_dir / "models" / "pretext").symlink_to(pretext_dir)  # the seed's pretext, paid once
    (run_dir / "export.json").write_text(json.dumps([t for t in export if t["data"]["key"] in want]))
    settings = Settings.from_env({})
    spec = ModelSpec.from_label_config(settings.label_config(), input_size=settings.input_size)
    labelled = labelled_set_from_export(run_dir / "export.json", spec, data_root)
    t0 = time.perf_counter()
    result = train_version(labelled, spec, Registry(run_dir / "models"), TrainConfig(threads=2, seed=seed),
                           {"export": "bench"})
    return result, time.perf_counter() - t0


def prepare_archive(work: Path, family: str, studies: int) -> Path:
    """A larger pool than ``bench_generalisation``'s (130 studies, ~390 images, under the 500-label budget):
    ``studies`` studies of the family, drawn with their own seed, imported like the other cohorts."""
    from bench_generalisation import prepare_cohort

    return prepare_cohort(work, family, f"archive{studies}", studies, ARCHIVE_SEED, 1024)


def curve(work: Path, family: str, order: str, budgets: list[int], seed: int, pool: str = "pool") -> list[dict]:
    from bench_generalisation import score_cohort, study_metrics
    from mammoflag.inference import calibrated_probabilities
    from mammoflag.spec import DEFAULT_INPUT_SIZE

    data_root = work / "data"
    pool_dir, test_dir = data_root / f"{family}-{pool}", data_root / f"{family}-test"
    export = json.loads((pool_dir / "export.json").read_text())
    budgets = [b for b in budgets if b <= len(export)]
    # each order's pretext is trained on its own first round, as a project's first training does: a cache
    # shared by the orders of a seed would hand every order the tiles of whichever ran first
    pretext_dir = work / "label-efficiency" / f"pretext-{pool}-{order}-s{seed}"
    pretext_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000 + seed)
    chosen: list[str] = []
    version, previous_run = None, None
    points = []
    for budget in budgets:
        need = budget - len(chosen)
        if order == "random" or (order == "uncertainty" and version is None):
            chosen += random_round(export, set(chosen), need, rng)
        elif version is None and order == "platform":
            chosen += typical_round(export, need, data_root, DEFAULT_INPUT_SIZE)
        elif version is None:  # stratified, first round
            chosen += cold_start_round(export, need)
        else:
            chosen += uncertain_round(export, set(chosen), need, version, data_root)
        if previous_run is not None:  # its model chose this round's images; no longer needed
            shutil.rmtree(previous_run / "models", ignore_errors=True)
        run_dir = work / "label-efficiency" / f"{family}-{pool}-{order}-s{seed}-{budget}"
        result, train_s = train_on(export, chosen, run_dir, pretext_dir, seed, data_root)
        previous_run = run_dir
        version = result.version
        rows, logits, header = score_cohort(version, test_dir)
        m = study_metrics(rows, calibrated_probabilities(logits, version.spec, header), version.spec, test_dir / "ground_truth.csv")
        aurocs = [v["image_auroc"] for v in m["per_class"].values() if v["image_auroc"] is not None]
        trust = version.card.trust
        verdicts = {c: t.verdict.value for c, t in trust.per_class.items()} if trust else {}
        points.append({"labels": len(chosen), "mean_auroc": float(np.mean(aurocs)), "per_class": m["per_class"],
                       "verdicts": verdicts, "train_s": round(train_s, 1), "load": os.getloadavg(),
                       "body_from": version.card.training.body_from,
                       "tile_start": version.card.training.details.get("tile_start"),
                       "zoom_start": version.card.training.details.get("zoom_start")})
        print(f"{family} {order} seed {seed} labels {len(chosen)}: mean AUROC {points[-1]['mean_auroc']:.3f} "
              f"({', '.join(c + ' %.2f' % v['image_auroc'] for c, v in m['per_class'].items())}) "
              f"train {train_s:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    if previous_run is not None:
        shutil.rmtree(previous_run / "models", ignore_errors=True)
    return points


def summarise(runs: dict) -> dict:
    """Per order and budget: mean and spread over seeds of mean AUROC and study sensitivity / specificity."""
    out: dict = {}
    for order, seeds in runs.items():
        by_budget: dict[int, list[dict]] = {}
        for points in seeds.values():
            for p in points:
                by_budget.setdefault(p["labels"], []).append(p)
        out[order] = {}
        for budget, ps in sorted(by_budget.items()):
            row = {"seeds": len(ps), "mean_auroc": float(np.mean([p["mean_auroc"] for p in ps])),
                   "mean_auroc_min": float(np.min([p["mean_auroc"] for p in ps])),
                   "mean_auroc_max": float(np.max([p["mean_auroc"] for p in ps]))}
            for c in ps[0]["per_class"]:
                for f in ("image_auroc", "study_sensitivity", "study_specificity"):
                    vals = [p["per_class"][c][f] for p in ps if p["per_class"][c][f] is not None]
                    row[f"{c}_{f}"] = float(np.mean(vals)) if vals else None
            out[order][str(budget)] = row
    return out


def versus(runs: dict, reference: str = "random") -> dict:
    """Per order and budget: the paired difference in mean AUROC from ``reference`` over the seeds both ran
    (same seed, same test cohort), its mean and range, and on how many seeds the order was ahead."""
    out: dict = {}
    for order, seeds in runs.items():
        if order == reference:
            continue
        rows: dict = {}
        for seed, points in seeds.items():
            ref = {p["labels"]: p["mean_auroc"] for p in runs.get(reference, {}).get(seed, [])}
            for p in points:
                if p["labels"] in ref:
                    rows.setdefault(str(p["labels"]), []).append(p["mean_auroc"] - ref[p["labels"]])
        out[order] = {b: {"seeds": len(d), "mean": float(np.mean(d)), "min": float(np.min(d)),
                          "max": float(np.max(d)), "ahead": int(sum(x > 0 for x in d))}
                      for b, d in sorted(rows.items(), key=lambda kv: int(kv[0]))}
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for order, rows in summary.items():
        b = [int(k) for k in rows]
        axes[0].errorbar(b, [r["mean_auroc"] for r in rows.values()],
                         yerr=[[r["mean_auroc"] - r["mean_auroc_min"] for r in rows.values()],
                               [r["mean_auroc_max"] - r["mean_auroc"] for r in rows.values()]],
                         marker="o", capsize=3, label=order)
        for ax, f in ((axes[1], "study_sensitivity"), (axes[2], "study_specificity")):
            for c, style in (("biopsy_tool", "-"), ("mag_view", "--")):
                vals = [r.get(f"{c}_{f}") for r in rows.values()]
                ax.plot(b, vals, style, marker="o", label=f"{order} {c}")
    axes[0].set_title("mean image AUROC (range over seeds)")
    axes[1].set_title("study sensitivity")
    axes[2].set_title("study specificity")
    for ax in axes:
        ax.set_xlabel("labels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_results(path: Path, family: str, pool: str, budgets: list[int], runs: dict, machine: dict) -> None:
    summary = summarise(runs)
    out = {"family": family, "pool": pool, "budgets": budgets, "pretext": PRETEXT_PER_ORDER,
           "training": TRAINING_MARK, "runs": runs,
           "summary": summary, "versus_random": versus(runs), "machine": machine}
    path.write_text(json.dumps(out, indent=1, sort_keys=True))
    plot(summary, path.with_suffix(".png"),
         f"label efficiency on the '{family}' family (defaults tuned on 'standard'), 2 cores")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--family", default="shifted")
    p.add_argument("--budgets", default="50,100,200,350,500")
    p.add_argument("--orders", default="random,platform,stratified")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pool-studies", type=int, default=0,
                   help="label from a pool of this many studies of the family (made once under --work) instead of "
                        "bench_generalisation's 130-study pool, which cannot reach 500 labels")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    budgets = [int(b) for b in args.budgets.split(",")]
    previous = json.loads(args.results.read_text()) if args.results.exists() else {}
    pool = f"archive{args.pool_studies}" if args.pool_studies else "pool"
    if args.pool_studies:
        prepare_archive(args.work, args.family, args.pool_studies)
    # runs from before each order trained its own pretext (a seed's orders shared the first one's), or of
    # another training, are not resumed
    same = (previous.get("family") == args.family and previous.get("pool", "pool") == pool
            and previous.get("pretext") == PRETEXT_PER_ORDER and previous.get("training") == TRAINING_MARK)
    runs: dict = previous.get("runs", {}) if same else {}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for order in args.orders.split(","):
            if [p["labels"] for p in runs.get(order, {}).get(str(seed), [])] == budgets:
                continue  # measured already (a re-run resumes)
            runs.setdefault(order, {})[str(seed)] = curve(args.work, args.family, order, budgets, seed, pool)
            write_results(args.results, args.family, pool, budgets, runs, machine)
    write_results(args.results, args.family, pool, budgets, runs, machine)  # a resumed run's summary, too
    print(json.dumps({"summary": summarise(runs), "versus_random": versus(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
