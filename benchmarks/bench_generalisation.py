"""Generalisation benchmark: train on one synthetic family, flag a held-out cohort of another.

    # 1. cohorts: synthetic DICOMs -> importer (display long side 1024) -> export labelled from truth
    nice .venv/bin/python benchmarks/bench_generalisation.py prepare --work /tmp/mammoflag-gen
    # 2. default `mammoflag train` on <= 350 labels of one family, then the flagger on the other's test cohort
    nice .venv/bin/python benchmarks/bench_generalisation.py run --work /tmp/mammoflag-gen \
        --train standard --test shifted --labels 350
    # results merge into benchmarks/results/generalisation.json (one key per train->test pair)

What one run does is what a user does: the label pool's export (one reader, labels from ground
truth) is cut to ``--labels`` tasks (random order, whole studies), ``training.train.train_version``
trains with every default of ``TrainConfig`` (random initialisation, the default network and
input size), and the served model scores the *test* cohort, whose patients, seed and
(for a cross-family pair) generator parameters the run never saw, as it serves
(``OnnxClassifier``: INT8 when training kept it) at the thresholds training calibrated.
Study-level figures follow the flagger's rule (flagger/outputs.py): a study is flagged for a
class when any of its images is. ``test`` scores each image with its header evidence, as served;
``test_headers_empty`` scores the same model as if every header were empty (the image alone). The
served model's raw logits, header evidence and targets (validation and test) go to
``<work>/logits/<run>.npz`` for judging calibration variants without training again. (The flagger's trust gate is not applied here: the point is
what the model does, whatever its card says of it.)

Timings: the wall time of the training run, its process CPU time (user + system; on an otherwise
idle 2-core machine the wall time is about half of it) and the load average before and after.

Figures depend on the machine's load: the script prints ``os.getloadavg()`` beside every timing.
"""

from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "benchmarks" / "results" / "generalisation.json"
SECRET = "bench-generalisation-secret"

# (role, studies, seed offset): the pool is what annotators label; test is flagged, never labelled
COHORTS = {"pool": (130, 0), "test": (100, 500)}


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


# -- data ----------------------------------------------------------------------------------------

def prepare_cohort(work: Path, family: str, role: str, studies: int, seed: int, size: int | None) -> Path:
    """DICOMs of one family -> import DATA_DIR under work/data -> export.json labelled from truth."""
    from importers.run import import_dicoms
    from importers.synthetic import read_ground_truth, write_synthetic_cohort
    from mammoflag.dicom.types import NormalizeOptions
    from ls_helpers import export_from_truth, truth_by_key
    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec

    name = f"{family}-{role}"
    out = work / "data" / name
    if (out / "export.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    dicom = work / "dicom" / name
    shutil.rmtree(dicom, ignore_errors=True)
    t0 = time.perf_counter()
    gt = write_synthetic_cohort(dicom, studies, seed=seed, size=size, family=family, compressions=("none",),
                                multiframe=False)
    import_dicoms(dicom, out, NormalizeOptions(long_side=1024), SECRET, data_root=work / "data", workers=1,
                  progress=False)
    spec = ModelSpec.from_label_config(Settings.from_env({}).label_config())
    tasks = json.loads((out / "tasks.json").read_text())
    truth = truth_by_key(read_ground_truth(gt))
    (out / "export.json").write_text(json.dumps(export_from_truth(tasks, truth, spec)))
    shutil.copyfile(gt, out / "ground_truth.csv")
    shutil.rmtree(dicom, ignore_errors=True)
    print(f"{name}: {len(tasks)} images from {studies} studies in {time.perf_counter() - t0:.0f} s ({_load()})",
          flush=True)
    return out


def prepare(work: Path, families: list[str], size: int | None, seed: int) -> None:
    # a cohort's seed is its role's (pool and test never share one), not its family's place in --families:
    # `prepare --families shifted` and `--families standard,shifted` make the same shifted cohorts
    # (before 2026-12-03 the second family of a list drew with seed + 100)
    for family in families:
        for role, (studies, offset) in COHORTS.items():
            prepare_cohort(work, family, role, studies, seed + offset, size)


# -- one train -> test run -----------------------------------------------------------------------

def pick_labels(export: list[dict], n_labels: int, seed: int) -> list[dict]:
    """Whole studies in a random order until ``n_labels`` tasks (annotators label study by study)."""
    by_study: dict[str, list[dict]] = {}
    for task in export:
        by_study.setdefault(task["data"]["study_instance_uid"], []).append(task)
    order = list(by_study)
    np.random.default_rng(seed).shuffle(order)
    chosen: list[dict] = []
    for study in order:
        if len(chosen) + len(by_study[study]) > n_labels:
            continue
        chosen.extend(by_study[study])
    return chosen


def score_cohort(version, data_dir: Path, batch: int = 32) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(manifest rows, raw logits, header evidence) of every image of an import DATA_DIR, through the model the
    flagger serves (``OnnxClassifier``, INT8 when training kept it). ``mammoflag.inference.calibrated_probabilities``
    turns them into what it serves (header None: as if every header were empty, the image alone)."""
    from mammoflag.header_evidence import header_matrix
    from mammoflag.inference import OnnxClassifier
    from mammoflag.preprocess import load_display_image, model_input_batch

    rows = list(csv.DictReader(open(data_dir / "manifest.csv", newline="")))
    clf = OnnxClassifier(version, prefer_int8=True)
    logits = [clf.logits(model_input_batch([load_display_image(data_dir / r["image"]) for r in rows[i:i + batch]],
                                           version.spec.input_size))
              for i in range(0, len(rows), batch)]
    return rows, np.concatenate(logits), header_matrix(rows)


def group_max(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each group's (study's, patient's) highest value, groups in sorted order."""
    _, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    out = np.full(int(index.max()) + 1 if len(index) else 0, -np.inf)
    np.maximum.at(out, index, np.asarray(values, dtype=np.float64))
    return out


def study_sens_spec(flagged: np.ndarray, y: np.ndarray, study: np.ndarray) -> dict:
    """Study-level sensitivity and specificity under the flagger's rule (flagger/outputs.py: any flagged image
    flags its study; a study is positive when any of its images is), with the study counts."""
    positive, flags = group_max(y, study) > 0.5, group_max(flagged, study) > 0.5
    return {"study_sensitivity": float(flags[positive].mean()) if positive.any() else None,
            "study_specificity": float(1 - flags[~positive].mean()) if (~positive).any() else None,
            "study_positives": int(positive.sum()), "study_negatives": int((~positive).sum())}


def study_metrics(rows: list[dict], probs: np.ndarray, spec, truth_csv: Path) -> dict:
    """Image AUROC and sens/spec, and study sens/spec under the flagger's rule (flagger/outputs.py: an image
    flags a class when its calibrated probability >= the threshold; any flagged image flags its study)."""
    from importers.synthetic import read_ground_truth
    from ls_helpers import truth_by_key
    from training.calibrate import auroc

    truth = truth_by_key(read_ground_truth(truth_csv))
    study = np.array([r["study_instance_uid"] for r in rows])
    out: dict = {"n_images": len(rows), "n_studies": len(set(study.tolist())), "per_class": {}}
    for k, c in enumerate(spec.classes):
        y = np.array([int(truth[r["key"]][c]) for r in rows])
        flagged = probs[:, k] >= spec.thresholds[c]
        out["per_class"][c] = {
            "image_auroc": auroc(probs[:, k], y),
            "image_sensitivity": float(flagged[y == 1].mean()) if (y == 1).any() else None,
            "image_specificity": float(1 - flagged[y == 0].mean()) if (y == 0).any() else None,
            **study_sens_spec(flagged, y, study),
            "threshold": float(spec.thresholds[c]),
        }
    return out


def run(work: Path, train_family: str, test_family: str, n_labels: int, seed: int, threads: int,
        overrides: dict, key: str | None = None) -> dict:
    """One train -> test run; its logits go to ``<work>/logits/<key>.npz`` (``bench_thresholds.py`` reads them)."""
    import torch

    from mammoflag.inference import calibrated_probabilities
    from mammoflag.registry import Registry
    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec
    from training.dataset import labelled_set_from_export
    from training.train import TrainConfig, train_version

    torch.set_num_threads(threads)
    pool_dir = work / "data" / f"{train_family}-pool"
    test_dir = work / "data" / f"{test_family}-test"
    export = json.loads((pool_dir / "export.json").read_text())
    chosen = pick_labels(export, n_labels, seed)
    run_dir = work / "runs" / f"{train_family}-{test_family}-{n_labels}-s{seed}-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "export.json").write_text(json.dumps(chosen))
    settings = Settings.from_env({})
    spec = ModelSpec.from_label_config(settings.label_config(), input_size=settings.input_size)
    labelled = labelled_set_from_export(run_dir / "export.json", spec, work / "data")
    config = TrainConfig(threads=threads, seed=seed, **overrides)
    load_before = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = train_version(labelled, spec, Registry(run_dir / "models"), config, {"export": "bench"})
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    card = result.card
    print(f"trained {result.version.name} on {len(chosen)} labels in {train_s:.0f} s ({_load()})", flush=True)
    t0 = time.perf_counter()
    rows, test_logits, test_header = score_cohort(result.version, test_dir)
    flag_s = time.perf_counter() - t0
    spec = result.version.spec
    metrics = study_metrics(rows, calibrated_probabilities(test_logits, spec, test_header), spec,
                            test_dir / "ground_truth.csv")
    headers_empty = study_metrics(rows, calibrated_probabilities(test_logits, spec, None), spec,
                                  test_dir / "ground_truth.csv")
    valid = _card_valid(card)
    dump_logits(result.version, labelled, config, rows, test_logits, test_header, test_dir,
                work / "logits" / f"{(key or run_dir.name).replace('>', '')}.npz")
    out = {
        "train_family": train_family, "test_family": test_family, "labels": len(chosen), "seed": seed,
        "overrides": overrides, "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()}, "fit": _fit_details(card),
        "flag_s": round(flag_s, 1),
        "score_images_per_s": round(len(rows) / flag_s, 1), "load_before": load_before,
        "load_after": os.getloadavg(), "test": metrics, "test_headers_empty": headers_empty, "valid": valid,
        "verdicts": {c: t.verdict.value for c, t in card.trust.per_class.items()} if card.trust else {},
        "header_weights": {c: [round(x, 3) for x in w] for c, w in result.version.spec.header_weights.items()},
        "model": {"version": result.version.name, "input_size": result.version.spec.input_size,
                  "architecture": getattr(result.version.spec, "architecture", "resnet18"),
                  "int8": _int8_kept(card)},
    }
    shutil.rmtree(run_dir / "models", ignore_errors=True)
    return out


def dump_logits(version, labelled, config, rows: list[dict], test_logits: np.ndarray, test_header: np.ndarray,
                test_dir: Path, path: Path) -> None:
    """The served model's raw logits, header evidence, targets and groups on its validation images and on the
    test cohort (``.npz``; the test cohort's from ``score_cohort``): calibration variants can then be judged
    without training again."""
    from importers.synthetic import read_ground_truth
    from ls_helpers import truth_by_key
    from mammoflag.inference import OnnxClassifier
    from training.train import load_inputs

    clf = OnnxClassifier(version, prefer_int8=True)
    _, valid_items = labelled.split(config.valid_fraction)
    valid, _ = load_inputs(valid_items, version.spec.input_size, len(version.spec.classes))
    truth = truth_by_key(read_ground_truth(test_dir / "ground_truth.csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, valid_logits=clf.logits(valid.x), valid_header=valid.header, valid_y=valid.y,
             valid_groups=np.array([i.group for i in valid.items]), test_logits=test_logits,
             test_header=test_header, test_y=np.array([[int(truth[r["key"]][c]) for c in version.spec.classes]
                                                                for r in rows]),
             test_study=np.array([r["study_instance_uid"] for r in rows]), classes=np.array(version.spec.classes))


def _card_valid(card) -> dict:
    """Validation AUROC per class from the model card (dict cards and typed cards alike)."""
    try:
        per_class = card.metrics.per_class
        return {c: getattr(m, "auroc", None) for c, m in per_class.items()}
    except AttributeError:
        return {c: m["auroc"] for c, m in card["metrics"]["per_class"].items()}


def _fit_details(card) -> dict:
    try:
        t = card.training
        return {"mode": t.mode, "lr": t.lr, **dict(t.details)}
    except AttributeError:
        return {k: v for k, v in card["training"].items() if k in ("mode", "lr", "epochs", "best_epoch")}


def _int8_kept(card) -> bool:
    try:
        return bool(card.int8.kept)
    except AttributeError:
        return bool(card["int8"]["kept"])


def merge_results(key: str, value: dict, results_path: Path) -> None:
    from results_file import merge_results as merge

    merge(key, value, results_path, {"cpus": os.cpu_count(), "processor": platform.processor(),
                                     "python": platform.python_version()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--families", default="standard,shifted")
    a.add_argument("--size", type=int, default=1024, help="synthetic long side (0: each vendor's detector size)")
    a.add_argument("--seed", type=int, default=31)
    r = sub.add_parser("run")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--train", default="standard")
    r.add_argument("--test", default="shifted")
    r.add_argument("--labels", type=int, default=350)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--set", action="append", default=[], help="TrainConfig override name=json_value")
    r.add_argument("--key", default=None)
    r.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("training.train").setLevel(logging.INFO)  # one line per epoch
    if args.cmd == "prepare":
        prepare(args.work, args.families.split(","), args.size or None, args.seed)
        return 0
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    key = args.key or f"{args.train}->{args.test}_{args.labels}_s{args.seed}"
    res = run(args.work, args.train, args.test, args.labels, args.seed, args.threads, overrides, key)
    print(json.dumps(res, indent=2))
    merge_results(key, res, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
