"""Training benchmark: end-to-end retrain time and accuracy per speed option, and active-learning curves.

    # 1. make the data (synthetic DICOM cohort -> importer -> Label Studio export labelled from truth)
    python benchmarks/bench_training.py prepare --out /tmp/mammoflag-bench --studies 230
    # 2. retrain on 500 labels end to end, one run per speed option (nice it: the machine is shared)
    nice python benchmarks/bench_training.py speed --data /tmp/mammoflag-bench --labels 500 --input-size 128
    # 3. accuracy vs number of labels, uncertainty-ordered vs random labelling
    nice python benchmarks/bench_training.py curve --data /tmp/mammoflag-bench
    # results merge into benchmarks/results/training.json

"End to end" is what a retrain does: read the export, resolve and load 500 display PNGs, fit,
calibrate, export ONNX with the parity check, quantize to INT8 and check it, compare with the
current version, register. Accuracy is the mean AUROC over the finding classes on a held-out
test set of patients the run never sees (the patient-hash split's validation side is used for
calibration inside the run; the test set is a second, disjoint set of patients).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "training.json"
TEST_SALT = "mammoflag-bench-test-v1"  # a second hash split: these patients are never labelled
BUDGETS = (50, 100, 200, 350, 500)


# -- data ----------------------------------------------------------------------------------------

def prepare(out: Path, studies: int, seed: int, long_side: int) -> None:
    """Synthetic cohort -> import -> export.json labelled from ground truth (one reader)."""
    sys.path.insert(0, str(REPO / "tests"))
    from importers.run import import_dicoms
    from importers.synthetic import read_ground_truth, write_synthetic_cohort
    from mammoflag.dicom.types import NormalizeOptions
    from ls_helpers import export_from_truth, truth_by_key

    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec

    shutil.rmtree(out, ignore_errors=True)
    dicom = Path(f"/tmp/bench-dicom-{os.getpid()}")
    t0 = time.perf_counter()
    gt = write_synthetic_cohort(dicom, studies, seed=seed, size=320, compressions=("none",))
    import_dicoms(dicom, out / "data" / "cohort", NormalizeOptions(long_side=long_side), "bench-secret",
                  data_root=out / "data", workers=1, progress=False)
    spec = ModelSpec.from_label_config(Settings.from_env({}).label_config())
    tasks = json.loads((out / "data" / "cohort" / "tasks.json").read_text())
    export = export_from_truth(tasks, truth_by_key(read_ground_truth(gt)), spec)
    (out / "export.json").write_text(json.dumps(export))
    shutil.rmtree(dicom, ignore_errors=True)
    print(f"prepared {len(export)} labelled tasks from {studies} studies in {time.perf_counter() - t0:.0f} s")


def load_pool(data: Path, input_size: int):
    """(spec, labelled set of the label pool, test items): the test patients are split off by a second hash."""
    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec
    from training.dataset import labelled_set_from_export, split_of

    spec = ModelSpec.from_label_config(Settings.from_env({}).label_config(), input_size=input_size)
    everything = labelled_set_from_export(data / "export.json", spec, data / "data")
    test = [i for i in everything.items if split_of(i.group, 0.2, salt=TEST_SALT) == "valid"]
    pool = [i for i in everything.items if split_of(i.group, 0.2, salt=TEST_SALT) == "train"]
    return spec, replace(everything, items=tuple(pool)), test


def test_auroc(version_path: Path, test_items, spec) -> dict:
    from mammoflag.inference import OnnxClassifier
    from mammoflag.preprocess import load_display_image
    from mammoflag.registry import read_version
    from training.calibrate import auroc

    clf = OnnxClassifier(read_version(version_path), prefer_int8=True)
    probs = clf.probabilities_for_displays([load_display_image(i.image) for i in test_items])
    y = np.array([i.target for i in test_items])
    per = {c: auroc(probs[:, k], y[:, k]) for k, c in enumerate(spec.classes)}
    vals = [v for v in per.values() if v is not None]
    return {"per_class": per, "mean": float(np.mean(vals)) if vals else None, "n_test": len(test_items)}


# -- speed options -------------------------------------------------------------------------------

def speed(data: Path, labels: int, input_size: int, epochs: int, options: list[str], threads: int) -> dict:
    from mammoflag.registry import Registry
    from training.dataset import labelled_set_from_export
    from training.train import TrainConfig, train_version

    spec, pool, test = load_pool(data, input_size)
    rng = np.random.default_rng(0)
    chosen = [pool.items[i] for i in sorted(rng.choice(len(pool.items), size=min(labels, len(pool.items)),
                                                       replace=False))]
    export_subset = data / f"export-{labels}.json"
    keys = {i.key for i in chosen}
    export_subset.write_text(json.dumps([t for t in json.loads((data / "export.json").read_text())
                                         if t["data"].get("key") in keys]))
    base = TrainConfig(epochs=epochs, threads=threads, batch_size=32)
    configs = {
        "fine_tune": base,
        "fine_tune_no_channels_last": replace(base, channels_last=False),
        "fine_tune_fixed_lr_no_lr_find": replace(base, lr=3e-3),
        "frozen_body_only": replace(base, mode="frozen", frozen_epochs=epochs + 1),
        "head_only_cached_features": replace(base, mode="head_only", head_epochs=12),
        "fine_tune_no_int8": replace(base, quantize_int8=False),
        "fine_tune_again_parent_lr": base,  # a second fine-tune: takes the parent's lr, skips lr_find
    }
    results = {}
    models = Path(f"/tmp/bench-models-{os.getpid()}")
    shutil.rmtree(models, ignore_errors=True)
    for name in options:
        config = configs[name]
        t0 = time.perf_counter()
        labelled = labelled_set_from_export(export_subset, spec, data / "data")  # end to end: read the export too
        result = train_version(labelled, spec, Registry(models), config, {"export": export_subset.name})
        wall = time.perf_counter() - t0
        card = result.card
        results[name] = {
            "wall_s": round(wall, 1),
            "timings_s": {k: round(v, 1) for k, v in card.training.timings_s.items()},
            "labels": card.label_count,
            "valid_mean_auroc": card.metrics.mean_auroc,
            "test": test_auroc(result.version.path, test, spec),
            "int8_kept": card.int8.kept,
            "body_from": card.training.body_from,
            "lr": card.training.lr,
            "lr_source": card.training.lr_source,
        }
        print(name, json.dumps(results[name]), flush=True)
    shutil.rmtree(models, ignore_errors=True)
    return {"input_size": input_size, "epochs": epochs, "threads": threads, "labels": labels, "options": results}


# -- active learning curve -----------------------------------------------------------------------

def curve(data: Path, input_size: int, epochs: int, threads: int, seed: int, lr: float | None = None) -> dict:
    """Mean test AUROC after 50..500 labels, labelled in random or in uncertainty order.

    Both orders start from the same 50 random labels. Uncertainty order then asks for the
    pool images the current model is least sure of (lowest mammoflag.inference.uncertainty_score,
    the ML backend's score), as Label Studio's uncertainty sampling would serve them.
    """
    import torch

    from mammoflag.inference import uncertainty_score
    from training.calibrate import calibrate, mean_auroc, sigmoid
    from training.train import TrainConfig, build_learner, fit, load_inputs
    from training.export import torch_logits

    spec, pool, test = load_pool(data, input_size)
    config = TrainConfig(epochs=epochs, threads=threads, batch_size=32, seed=seed, lr=lr)
    torch.set_num_threads(threads)
    n_classes = len(spec.classes)
    pool_inputs, _ = load_inputs(pool.items, input_size, n_classes)
    test_inputs, _ = load_inputs(test, input_size, n_classes)

    def train_and_score(idx: np.ndarray):
        from fastai.torch_core import set_seed

        set_seed(seed, reproducible=True)
        x, y = pool_inputs.x[idx], pool_inputs.y[idx]
        learn = build_learner(x, y, test_inputs.x, test_inputs.y, n_classes, config)
        fit(learn, x, y, test_inputs.x, test_inputs.y, config, pretrained=False)
        model = learn.model.eval().to(memory_format=torch.contiguous_format)
        test_probs = sigmoid(torch_logits(model, test_inputs.x))
        # temperatures from the labelled set (the run has no other), for the uncertainty score
        train_logits = torch_logits(model, x)
        cal = calibrate(train_logits, y, spec.classes, 0.95)
        temps = np.array([cal.temperatures[c] for c in spec.classes])
        pool_probs = sigmoid(torch_logits(model, pool_inputs.x) / temps)
        return mean_auroc(test_probs, test_inputs.y), uncertainty_score(pool_probs)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool.items))
    budgets = [b for b in BUDGETS if b <= len(order)]
    out: dict = {"random": {}, "uncertainty": {}, "pool": len(order), "n_test": len(test),
                 "input_size": input_size, "epochs": epochs, "lr": lr or "lr_find"}
    for b in budgets:
        t0 = time.perf_counter()
        out["random"][b], _ = train_and_score(order[:b])
        print(f"random {b}: {out['random'][b]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    labelled = list(order[:budgets[0]])
    for n, b in enumerate(budgets):
        t0 = time.perf_counter()
        auc, confidence = train_and_score(np.array(labelled))
        out["uncertainty"][b] = auc
        print(f"uncertainty {b}: {auc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if n + 1 < len(budgets):
            taken = set(labelled)
            ranked = [i for i in np.argsort(confidence, kind="stable") if i not in taken]
            labelled += ranked[:budgets[n + 1] - b]
    return out


# -- main ----------------------------------------------------------------------------------------

def merge_results(key: str, value: dict, results_path: Path) -> None:
    from results_file import merge_results as merge

    merge(key, value, results_path, {"cpu_affinity": len(os.sched_getaffinity(0)),
                                     "processor": platform.processor() or platform.machine(),
                                     "python": platform.python_version()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--studies", type=int, default=230)
    a.add_argument("--seed", type=int, default=11)
    a.add_argument("--long-side", type=int, default=256)
    for name in ("speed", "curve"):
        s = sub.add_parser(name)
        s.add_argument("--data", type=Path, required=True)
        s.add_argument("--input-size", type=int, default=128)
        s.add_argument("--epochs", type=int, default=3)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--results", type=Path, default=RESULTS)
        s.add_argument("--key", default=None, help="name of this result in training.json")
    sub.choices["speed"].add_argument("--labels", type=int, default=500)
    sub.choices["speed"].add_argument("--options", default="fine_tune,fine_tune_no_channels_last,"
                                      "fine_tune_fixed_lr_no_lr_find,frozen_body_only,head_only_cached_features")
    sub.choices["curve"].add_argument("--seed", type=int, default=0)
    sub.choices["curve"].add_argument("--lr", type=float, default=None, help="fixed learning rate (default lr_find)")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.out, args.studies, args.seed, args.long_side)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.cmd == "speed":
        res = speed(args.data, args.labels, args.input_size, args.epochs, args.options.split(","), args.threads)
    else:
        res = curve(args.data, args.input_size, args.epochs, args.threads, args.seed, args.lr)
    merge_results(args.key or f"{args.cmd}_{args.input_size}px", res, args.results)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
