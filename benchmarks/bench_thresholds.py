"""Which threshold rule gives study-level flags that hold on another family? (issue 13 diagnostics)

    nice .venv/bin/python benchmarks/bench_thresholds.py --work /tmp/mammoflag-gen [--class mag_view]

Reads the logits ``bench_generalisation.py run`` leaves under ``<work>/logits/*.npz`` (the served model's
raw logits and header evidence on its validation images and on the other family's test cohort) and
calibrates them again with each rule, without training again:

- ``default``: ``training.calibrate.calibrate`` as shipped (the image alone's threshold for 0.95
  sensitivity, or, with header weights and fewer than ``MIN_SPEAKING_POSITIVES`` validation positives
  whose header speaks, the lower of the image's and the fused score's);
- ``aligned``: the ``header_speaks`` intercept always moved so that one threshold suits images with and
  without a header (as ``default`` does given 20 such positives);
- ``study``: ``default``'s calibration, but the threshold is chosen on *patients* (each validation
  patient's highest score; the flagger flags a study when any image reaches the threshold), for 0.95
  of the positive patients.

Each is scored as the flagger scores: study-level sensitivity and specificity on the test cohort.
Results: ``benchmarks/results/thresholds.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TARGET = 0.95


def study_figures(probs: np.ndarray, y: np.ndarray, study: np.ndarray, threshold: float) -> dict:
    from bench_generalisation import study_sens_spec

    figures = study_sens_spec(probs >= threshold, y, study)
    return {"threshold": round(float(threshold), 4),
            **{k: None if figures[k] is None else round(figures[k], 3)
               for k in ("study_sensitivity", "study_specificity")}}


def rules(npz: Path, cls: str) -> dict:
    from bench_generalisation import group_max
    from training.calibrate import (MIN_SPEAKING_POSITIVES, apply_calibration, auroc, calibrate,
                                    threshold_for_sensitivity)

    d = np.load(npz, allow_pickle=False)
    classes = [str(c) for c in d["classes"]]
    k = classes.index(cls)
    vz, vh, vy, vg = d["valid_logits"], d["valid_header"], d["valid_y"], d["valid_groups"]
    tz, th, ty, ts = d["test_logits"], d["test_header"], d["test_y"], d["test_study"]
    header_classes = (cls,) if np.any(vh) else ()
    out: dict = {"valid_positives": int(vy[:, k].sum()),
                 "test_positive_studies": int((group_max(ty[:, k], ts) > 0.5).sum())}

    def scored(min_speaking: int):
        cal = calibrate(vz, vy, classes, TARGET, header=vh, header_classes=header_classes,
                        min_speaking_positives=min_speaking)
        return cal, apply_calibration(vz, cal, classes, vh)[:, k], apply_calibration(tz, cal, classes, th)[:, k]

    cal, valid_p, test_p = scored(MIN_SPEAKING_POSITIVES)
    out["test_image_auroc"] = round(float(auroc(test_p, ty[:, k])), 3)
    out["default"] = study_figures(test_p, ty[:, k], ts, cal.thresholds[cls])
    aligned, _, aligned_p = scored(0)
    out["aligned"] = study_figures(aligned_p, ty[:, k], ts, aligned.thresholds[cls])
    out["study"] = study_figures(test_p, ty[:, k], ts, threshold_for_sensitivity(group_max(valid_p, vg),
                                                                                 group_max(vy[:, k], vg), TARGET))
    return out


def main() -> None:
    from results_file import merge_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--class", dest="cls", default="mag_view")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "thresholds.json")
    args = ap.parse_args()
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    for npz in sorted((args.work / "logits").glob("*.npz")):
        result = rules(npz, args.cls)
        print(f"{npz.stem} {args.cls}: valid positives {result['valid_positives']}, test AUROC "
              f"{result['test_image_auroc']}; " + "; ".join(
                  f"{r} t={result[r]['threshold']} sens {result[r]['study_sensitivity']} spec "
                  f"{result[r]['study_specificity']}" for r in ("default", "aligned", "study")), flush=True)
        merge_results(f"{npz.stem}:{args.cls}", result, args.results, machine)


if __name__ == "__main__":
    main()
