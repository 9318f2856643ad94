"""Novelty: does ``mammoflag flag`` say when a cohort is unlike the images its model was validated on?

    nice .venv/bin/python benchmarks/bench_generalisation.py prepare --work /tmp/mammoflag-gen \
        --families standard,shifted,classic
    nice .venv/bin/python benchmarks/bench_novelty.py --work /tmp/mammoflag-gen --train standard,shifted --seeds 0,1,2
    # results: benchmarks/results/novelty.json

Each run is a user's: ``training.train.train_version`` with every default on 350 labels of one family's
pool (whole studies, random order: ``bench_generalisation.pick_labels``), then ``flagger.core.flag_cohort``
on the test cohort of every family (import DATA_DIRs the run never saw). For each cohort it records the
flagger's own shift test (``FlagSummary.shift``: the tail test, images beyond the validation's reference
distance against the beta-binomial, and the rank test, studies' mean novelty against the validation
patients', of ``mammoflag.novelty``), whether it warned, the manufacturer warning beside
it (``FlagSummary.unvalidated``), and the model's study-level figures on that cohort, so that a warning
can be read against what the flags were worth.

- A cohort of the training family (other patients, other seed) is the null: a warning there is a false alarm.
- ``shifted`` is wider than ``standard`` (more vendors, noise, LUTs, marker shapes): a model trained on
  ``standard`` meets images outside what it learned; one trained on ``shifted`` meets a narrower cohort
  inside its range. ``classic`` is the old generator's look, unlike both.
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
RESULTS = REPO / "benchmarks" / "results" / "novelty.json"
FAMILIES = ("standard", "shifted", "classic")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def train(work: Path, family: str, seed: int, n_labels: int, run_dir: Path):
    from bench_generalisation import pick_labels
    from mammoflag.registry import Registry
    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec
    from training.dataset import labelled_set_from_export
    from training.train import TrainConfig, train_version

    export = json.loads((work / "data" / f"{family}-pool" / "export.json").read_text())
    chosen = pick_labels(export, n_labels, seed)
    run_dir.mkdir(parents=True)
    (run_dir / "export.json").write_text(json.dumps(chosen))
    settings = Settings.from_env({})
    spec = ModelSpec.from_label_config(settings.label_config(), input_size=settings.input_size)
    labelled = labelled_set_from_export(run_dir / "export.json", spec, work / "data")
    config = TrainConfig(threads=2, seed=seed)
    result = train_version(labelled, spec, Registry(run_dir / "models"), config, {"export": "bench"})
    return result, len(chosen), labelled.split(config.valid_fraction)


def embeddings(version, train_items, valid_items, cohorts: dict[str, Path], path: Path) -> None:
    """The served file's embeddings of the training and validation images (with their patient groups) and of
    every cohort (with study ids) to ``path`` (.npz): novelty rules can be compared later without training."""
    import csv

    from mammoflag.inference import EMBEDDING_OUTPUT, OnnxClassifier
    from mammoflag.preprocess import load_display_image, model_input_batch

    clf = OnnxClassifier(version, prefer_int8=True)

    def embed(images: list[Path]) -> np.ndarray:
        out = [clf.session.run([EMBEDDING_OUTPUT], {clf.input_name: model_input_batch(
            [load_display_image(i) for i in images[j:j + 32]], version.spec.input_size).astype(np.float32)})[0]
            for j in range(0, len(images), 32)]
        return np.concatenate(out)

    arrays = {"train": embed([i.image for i in train_items]), "valid": embed([i.image for i in valid_items]),
              "valid_groups": np.array([i.group for i in valid_items])}
    for name, data_dir in cohorts.items():
        rows = list(csv.DictReader(open(data_dir / "manifest.csv", newline="")))
        arrays[name] = embed([data_dir / r["image"] for r in rows])
        arrays[f"{name}_study"] = np.array([r["study_instance_uid"] for r in rows])
    np.savez_compressed(path, **arrays)


def flag(version, data_dir: Path, out: Path) -> dict:
    """The flagger on one cohort: its shift test and manufacturer warning, and study figures from flags.csv."""
    import csv

    from bench_generalisation import study_sens_spec
    from flagger.core import FlagOptions, FlagOutputs, flag_cohort
    from flagger.reliability import ClassSelection
    from importers.synthetic import read_ground_truth
    from ls_helpers import truth_by_key

    t0 = time.perf_counter()
    summary = flag_cohort(data_dir, version, FlagOutputs(out / "flags.csv", out / "images.csv"),
                          options=FlagOptions(progress=False), selection=ClassSelection.everything(version.spec.classes))
    flag_s = time.perf_counter() - t0
    truth = truth_by_key(read_ground_truth(data_dir / "ground_truth.csv"))
    images = list(csv.DictReader(open(out / "images.csv", newline="")))
    study = np.array([r["study_id"] for r in images])
    novelty = np.array([float(r["novelty"]) for r in images])
    figures = {}
    for c in version.spec.classes:
        y = np.array([int(truth[r["key"]][c]) for r in images])
        figures[c] = study_sens_spec(np.array([int(r[f"flag_{c}"]) for r in images]), y, study)
    shift = summary.shift
    return {
        "images": summary.images, "studies": summary.studies, "flag_s": round(flag_s, 1),
        "shift": None if shift is None else {
            "beyond": shift.beyond, "rate": round(shift.rate, 4), "expected_rate": round(shift.expected_rate, 4),
            "k": shift.k, "n_validation": shift.n_validation, "tail_p": shift.p_value, "studies": shift.studies,
            "patients": shift.patients, "rank_p": shift.rank_p, "warned": shift.shifted},
        "novelty_quantiles": {q: round(float(np.quantile(novelty, q / 100)), 3) for q in (50, 90, 99)},
        "unvalidated_manufacturer_studies": sum(summary.unvalidated.values()),
        "study_figures": figures,
    }


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--train", default="standard,shifted")
    a.add_argument("--test", default=",".join(FAMILIES))
    a.add_argument("--seeds", default="0,1,2")
    a.add_argument("--labels", type=int, default=350)
    a.add_argument("--results", type=Path, default=RESULTS)
    args = a.parse_args(argv)
    import torch

    import flagger.core  # noqa: F401  (imported before the training runs: a later edit of the tree cannot break the run)
    from mammoflag.novelty import SHIFT_ALPHA

    torch.set_num_threads(2)
    cohorts = {t: args.work / "data" / f"{t}-test" for t in args.test.split(",")
               if (args.work / "data" / f"{t}-test").exists()}
    runs = []
    for family in args.train.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = args.work / "novelty" / f"{family}-s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            load_before, t0 = _load(), time.perf_counter()
            result, n_labels, (train_items, valid_items) = train(args.work, family, seed, args.labels, run_dir)
            card = result.card
            run = {"train_family": family, "seed": seed, "labels": n_labels, "train_s": round(time.perf_counter() - t0, 1), "load_before": load_before,
                   "novelty_s": round(result.timings.get("novelty_s", 0.0), 1),
                   "verdicts": {c: t.verdict.value for c, t in card.trust.per_class.items()} if card.trust else {},
                   "cohorts": {}}
            for test, data_dir in cohorts.items():
                run["cohorts"][test] = flag(result.version, data_dir, run_dir / f"flag-{test}")
                print(f"{family} s{seed} -> {test}: {run['cohorts'][test]['shift']} (load {_load()})", flush=True)
            run["load_after"] = _load()
            runs.append(run)
            embeddings(result.version, train_items, valid_items, cohorts,
                       args.work / "novelty" / f"{family}-s{seed}.npz")
            shutil.rmtree(run_dir / "models", ignore_errors=True)
    summary: dict = {}
    for run in runs:
        for test, c in run["cohorts"].items():
            kind = "same family (null)" if test == run["train_family"] else f"{run['train_family']}->{test}"
            s = summary.setdefault(kind, {"runs": 0, "warned": 0, "rates": []})
            s["runs"] += 1
            s["warned"] += int(bool(c["shift"] and c["shift"]["warned"]))
            s["rates"].append(c["shift"]["rate"] if c["shift"] else None)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "alpha": SHIFT_ALPHA,
           "labels": args.labels, "summary": summary, "runs": runs}
    args.results.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
