"""Cohort flagging speed and memory, beside the naive seed-style pipeline, in one run.

    nice .venv/bin/python benchmarks/bench_flagger.py [--images 600] [--dicoms 60] [--workdir DIR] [--sweep] [--save]

What it does:
1. Builds a real ResNet18 (torchvision, random weights: speed does not depend on them) at
   224, exports it to ONNX, quantizes it to static INT8 with training's own quantizer and
   registers both in a temporary registry (the INT8 one marked kept, as training would).
2. Writes uncompressed full-field synthetic DICOMs (importers.synthetic; a few drawn, the rest
   copies with new UIDs) and imports them into a DATA_DIR (display long side 1024); the
   DATA_DIR is then grown to ``--images`` rows by copying display PNGs under new UIDs.
3. Times, each in a fresh process (so peak RSS is that run's own):
   - the naive baseline: per image pydicom decode, float64 modality + VOI chain at full
     resolution, min-max to 8 bits, PIL resize to 224x224, one fp32 ONNX call per image;
     and the same per-image fp32 pipeline on the DATA_DIR's display PNGs;
   - ``flag_cohort`` from the DATA_DIR and from the DICOM folder (INT8, batched, decode processes).
4. Checks that flags.csv equals a straightforward reference (per image, same ONNX file,
   threshold, any image flags its study) on the same inputs.
5. Checks memory is flat: peak RSS of a run over 4x the images.

Figures are printed as a table and written to ``<workdir>/results.json``. The machine's load
(``os.getloadavg``) is printed before and after: other work on the same cores slows everything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# --model (read from the environment so the measured child processes build inputs of the same size):
# "default" = the network and input size `mammoflag train` trains by default (training/network.py),
# "resnet18" = the former default, torchvision ResNet18 at 224 px, for comparison.
MODEL = os.environ.get("MAMMOFLAG_BENCH_MODEL", "default")
# what a trained version weighs for mag_view (benchmarks/results/generalisation.json: header_speaks, mag_factor_present,
# mag_factor_excess, mag_modifier, ...), so the served path here adds a header offset as a real one does
STAND_IN_MAG_WEIGHTS = (-0.2, -0.2, 2.5, 2.1, 0.0, 0.0, 0.0)
NOVELTY_TRAIN = 450  # training images in the stand-in novelty reference (a 500-label project's split)
if MODEL == "resnet18":
    INPUT_SIZE = 224
else:
    from mammoflag.spec import DEFAULT_INPUT_SIZE as INPUT_SIZE  # noqa: E402
PATIENT_KEY_SECRET = "benchmark-only-secret"


# --------------------------------------------------------------------------------------------
# Set-up: model registry and data

def build_registry(root: Path, calibration_displays: list[np.ndarray]) -> Path:
    """A registry whose current version is the default network (or ResNet18), random weights, fp32 + kept INT8."""
    import torch
    import torchvision

    from label_config import load_label_config
    from mammoflag.preprocess import model_input_batch
    from mammoflag.card import stand_in_card
    from mammoflag.header_evidence import HEADER_FEATURES
    from mammoflag.registry import FP32_FILE, INT8_FILE, Registry
    from mammoflag.spec import ModelSpec
    from mammoflag.inference import EMBEDDING_OUTPUT
    from mammoflag.novelty import fit_reference, novelty_path
    from training.export import export_onnx, onnx_logits, quantize_static_int8

    spec = ModelSpec.from_label_config(load_label_config(), input_size=INPUT_SIZE)
    torch.manual_seed(0)
    if MODEL == "resnet18":
        resnet = torchvision.models.resnet18(weights=None)
        resnet.fc = torch.nn.Linear(resnet.fc.in_features, len(spec.classes))

        class FirstThreePlanes(torch.nn.Module):  # the model input's area, max and top-hat planes
            def forward(self, x):
                return x[:, :3]

        model = torch.nn.Sequential(FirstThreePlanes(), resnet).eval()
        spec = replace(spec, architecture="resnet18")
    else:
        from training.network import build_network

        model = build_network(spec.architecture, len(spec.classes)).eval()
    reg = Registry(root)
    with reg.staging() as tmp:
        export_onnx(model, tmp / FP32_FILE, INPUT_SIZE)
        inputs = model_input_batch(calibration_displays, INPUT_SIZE)
        quantize_static_int8(tmp / FP32_FILE, tmp / INT8_FILE, inputs)
        # Random weights put every image on one side of 0.5; a threshold at the 95th percentile of
        # the calibration images flags some studies and not others: a real check below.
        probs = 1 / (1 + np.exp(-onnx_logits(tmp / INT8_FILE, inputs).astype(np.float64)))
        # header weights as a trained version carries them for mag_view: the served path adds the header offset
        spec = spec.with_calibration({c: 1.0 for c in spec.classes},
                                     {c: _between(probs[:, k], 0.95) for k, c in enumerate(spec.classes)},
                                     HEADER_FEATURES, {"mag_view": STAND_IN_MAG_WEIGHTS})
        # a novelty reference per file as training keeps one (mammoflag.novelty), at the size of a 500-label
        # project's training set, so that the flagger's runs pay for it: calibration images and jittered copies
        for f in (FP32_FILE, INT8_FILE):
            emb = onnx_logits(tmp / f, inputs, output=EMBEDDING_OUTPUT).astype(np.float64)
            rng = np.random.default_rng(0)
            train = np.concatenate([emb] * math.ceil(NOVELTY_TRAIN / len(emb)))[:NOVELTY_TRAIN]
            train = train * (1 + 0.05 * rng.standard_normal(train.shape))
            fit_reference(f, train, emb).save(novelty_path(tmp, f))
        version = reg.publish(tmp, stand_in_card(spec, "benchmark: random weights, speed only", int8_kept=True))
    reg.set_current(version.name)
    return root


def _between(values: np.ndarray, quantile: float) -> float:
    """A threshold halfway between two neighbouring observed values: no image sits on it."""
    distinct = np.unique(values)
    k = min(len(distinct) - 2, int(quantile * (len(distinct) - 1)))
    return float((distinct[k] + distinct[k + 1]) / 2) if k >= 0 else 0.5


def write_dicoms(folder: Path, n_files: int, n_drawn: int) -> None:
    """``n_files`` uncompressed full-field DICOMs: ``n_drawn`` drawn, the rest copies under new UIDs."""
    import pydicom

    from importers.synthetic import write_synthetic_cohort

    drawn_dir = folder / "drawn"
    write_synthetic_cohort(drawn_dir, max(1, n_drawn // 3), seed=5, size=None, compressions=["none"],
                           multiframe=False, for_processing_every=10**6)
    (drawn_dir / "ground_truth.csv").unlink()
    drawn = sorted(p for p in drawn_dir.rglob("*") if p.is_file())
    for i in range(max(0, n_files - len(drawn))):
        ds = pydicom.dcmread(drawn[i % len(drawn)])
        study = i // 4
        ds.StudyInstanceUID = f"2.25.{900000000 + study}"
        ds.SeriesInstanceUID = f"2.25.{910000000 + study}"
        ds.SOPInstanceUID = f"2.25.{920000000 + i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = folder / "copies" / f"study{study:04d}" / f"IMG{i:04d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)


def grow_data_dir(data_dir: Path, n_rows: int) -> None:
    """Copy display PNGs under new UIDs until manifest.csv has ``n_rows`` rows (4 images per study)."""
    with open(data_dir / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        rows = list(reader)
    originals = list(rows)
    i = 0
    while len(rows) < n_rows:
        src = originals[i % len(originals)]
        n = len(rows)  # new UIDs from the row number: growing a grown DATA_DIR again stays unique
        sop, study = f"2.25.{930000000 + n}", f"2.25.{940000000 + n // 4}"
        image = Path("images") / sop / "0.png"
        (data_dir / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / src["image"], data_dir / image)
        rows.append({**src, "key": f"{sop}:0", "image": image.as_posix(), "sop_instance_uid": sop,
                     "study_instance_uid": study, "frame": "0"})
        i += 1
    with open(data_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows[:n_rows])


# --------------------------------------------------------------------------------------------
# The measured runs (each in its own process: `bench_flagger.py _run <json>`)

def naive_dicom(files: list[str], model_onnx: str) -> int:
    """The seed prototype's way: full float64 LUT chain, PIL resize, one fp32 ONNX call per image."""
    import onnxruntime as ort
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from mammoflag.preprocess import IMAGENET_MEAN, IMAGENET_STD

    session = ort.InferenceSession(model_onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for path in files:
        ds = pydicom.dcmread(path)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9) * 255.0
        img = Image.fromarray(arr.astype(np.uint8)).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        x = np.asarray(img, dtype=np.float32)[None]
        if MODEL == "resnet18":  # the seed's ImageNet normalisation (the model reads the first 3 of 5 planes)
            x = x / 255.0
            x = ((np.repeat(x, 3, axis=0) - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None])
            x = np.concatenate([x, x[:2]])[None]
        else:  # the default network takes uint8-valued planes
            x = np.repeat(x, 5, axis=0)[None]  # the five planes of mammoflag.preprocess.CHANNELS
        session.run(None, {name: x.astype(np.float32)})
    return len(files)


def naive_display(pngs: list[str], model_onnx: str) -> int:
    """Per image: load the display PNG, model input, one fp32 ONNX call."""
    import onnxruntime as ort

    from mammoflag.preprocess import load_display_image, model_input

    session = ort.InferenceSession(model_onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for path in pngs:
        session.run(None, {name: model_input(load_display_image(path), INPUT_SIZE)[None].astype(np.float32)})
    return len(pngs)


def model_alone(model_onnx: str, threads: int, n: int = 256, batch: int = 32) -> int:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model_onnx, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    from mammoflag.preprocess import CHANNELS

    x = np.random.default_rng(0).integers(0, 256, (batch, len(CHANNELS), INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    session.run(None, {name: x})  # warm-up outside the timing is not possible here: it is tiny vs n
    for _ in range(n // batch):
        session.run(None, {name: x})
    return n


def _auto(value: int | None) -> str:
    return "auto" if value is None else str(value)


def flag_run(input_path: str, registry: str, out_dir: str, workers: int | None, ort_threads: int | None,
             batch_size: int, display_long_side: int) -> dict:
    from flagger.core import FlagOptions, FlagOutputs, flag_cohort
    from mammoflag.registry import resolve_model

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    summary = flag_cohort(Path(input_path), resolve_model(registry), FlagOutputs(out / "flags.csv"),
                          options=FlagOptions(workers=workers, ort_threads=ort_threads, batch_size=batch_size,
                                              display_long_side=display_long_side, progress=False),
                          patient_key_secret=PATIENT_KEY_SECRET)
    return {"images": summary.images_stored, "problems": summary.problems, "model_file": summary.model_file}


class TreeRssSampler:
    """Peak resident memory of this process plus all its descendants (decode processes), sampled."""

    def __init__(self, interval_s: float = 0.1):
        import threading

        self.interval_s = interval_s
        self.peak_total_kb = self.peak_self_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeRssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        children: dict[int, list[int]] = defaultdict(list)
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children[ppid].append(int(entry))
            rss[int(entry)] = next((int(line.split()[1]) for line in status.splitlines()
                                    if line.startswith("VmRSS:")), 0)
        tree, todo = [], [me]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        self.peak_total_kb = max(self.peak_total_kb, sum(rss.get(p, 0) for p in tree))
        self.peak_self_kb = max(self.peak_self_kb, rss.get(me, 0))


def _run_child(spec: dict) -> None:
    with TreeRssSampler() as rss:
        result = _timed(spec)
    result.update(peak_rss_mb=rss.peak_self_kb / 1024, peak_tree_rss_mb=rss.peak_total_kb / 1024)
    print(json.dumps(result))


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (decode processes): independent of others' load."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(spec: dict) -> dict:
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    kind = spec.pop("kind")
    extra = {}
    if kind == "naive_dicom":
        n = naive_dicom(**spec)
    elif kind == "naive_display":
        n = naive_display(**spec)
    elif kind == "model_alone":
        n = model_alone(**spec)
    else:
        extra = flag_run(**spec)
        n = extra["images"]
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    return {"images": n, "seconds": elapsed, "images_per_s": n / elapsed, "cpu_ms_per_image": 1000 * cpu / n,
            **extra}


def measure(label: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_run", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["label"] = label
    print(f"  {label:<58} {result['images_per_s']:6.1f} img/s  {result['cpu_ms_per_image']:5.1f} CPU ms/img  "
          f"{result['images']:5d} images  "
          f"peak RSS {result['peak_tree_rss_mb']:5.0f} MB (main process {result['peak_rss_mb']:.0f} MB)",
          flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Reference check

def reference_flags(data_dir: Path, model_onnx: Path, spec) -> dict[str, tuple[int, ...]]:
    """Per image through ONNX Runtime on its own, plus its header offset, threshold, any image flags its study."""
    import onnxruntime as ort

    from mammoflag.header_evidence import header_evidence
    from mammoflag.preprocess import load_display_image, model_input

    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    flags: dict[str, list[int]] = defaultdict(lambda: [0] * len(spec.classes))
    margins = []
    with open(data_dir / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            logits = session.run(None, {name: model_input(load_display_image(data_dir / row["image"]),
                                                          spec.input_size)[None].astype(np.float32)})[0][0]
            evidence = header_evidence(row)
            for c, cls in enumerate(spec.classes):
                offset = float(np.dot(evidence, spec.header_weights.get(cls, np.zeros(len(evidence)))))
                p = 1 / (1 + math.exp(-(float(logits[c]) / spec.temperatures.get(cls, 1.0) + offset)))
                margins.append(abs(p - spec.thresholds.get(cls, 0.5)))
                flags[row["study_instance_uid"]][c] |= int(p >= spec.thresholds.get(cls, 0.5))
    return {k: tuple(v) for k, v in flags.items()}, min(margins)


def flags_csv(path: Path, classes) -> dict[str, tuple[int, ...]]:
    with open(path, newline="") as f:
        return {r["study_id"]: tuple(int(r[f"flag_{c}"]) for c in classes) for r in csv.DictReader(f)}


# --------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600, help="display images in the DATA_DIR run")
    ap.add_argument("--dicoms", type=int, default=60, help="full-field DICOM files in the end-to-end run")
    ap.add_argument("--drawn", type=int, default=9, help="how many DICOMs are drawn (the rest are copies)")
    ap.add_argument("--naive", type=int, default=16, help="images in each naive baseline run")
    ap.add_argument("--sweep", action="store_true", help="also time other decode-process / ORT-thread splits")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data here (reused when present)")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/flagger.json")
    ap.add_argument("--model", choices=["default", "resnet18"], default=MODEL,
                    help="default: the network training makes by default; resnet18: the former ResNet18 at 224")
    args = ap.parse_args()
    if args.model != MODEL:  # re-run with the model in the environment: the child processes must agree
        os.environ["MAMMOFLAG_BENCH_MODEL"] = args.model
        os.execv(sys.executable, [sys.executable, *sys.argv])

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-flagger-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"workdir {work}; load average before: {load_before}; {os.cpu_count()} CPUs", flush=True)

    from importers.run import import_dicoms
    from mammoflag.dicom.types import NormalizeOptions
    from mammoflag.preprocess import load_display_image
    from mammoflag.registry import resolve_model

    dicom_dir, data_dir, registry = work / "dicom", work / "data", work / "models"
    t = time.perf_counter()
    if not dicom_dir.exists():
        write_dicoms(dicom_dir, args.dicoms, args.drawn)
    if not (data_dir / "manifest.csv").exists():
        import_dicoms(dicom_dir, data_dir, NormalizeOptions(long_side=1024), PATIENT_KEY_SECRET, workers=2,
                      progress=False)
        grow_data_dir(data_dir, args.images)
    with open(data_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not (registry / "current").exists():
        build_registry(registry, [load_display_image(data_dir / r["image"]) for r in rows[: args.dicoms]])
    version = resolve_model(registry)
    print(f"set-up {time.perf_counter() - t:.0f}s: {args.dicoms} DICOMs, {len(rows)} display images, "
          f"model {version.name} (INT8 kept: {version.int8_path is not None})", flush=True)

    dicom_files = sorted(str(p) for p in dicom_dir.rglob("*") if p.is_file())
    results = []
    fp32, int8 = str(version.onnx_path), str(version.int8_path)
    print("model alone (batch 32, 2 threads):", flush=True)
    net = f"{version.spec.architecture}@{INPUT_SIZE}" if MODEL != "resnet18" else "ResNet18@224"
    results.append(measure(f"{net} fp32, ORT 2 threads", {"kind": "model_alone", "model_onnx": fp32, "threads": 2}))
    results.append(measure(f"{net} INT8, ORT 2 threads", {"kind": "model_alone", "model_onnx": int8, "threads": 2}))
    print("naive seed-style baseline:", flush=True)
    results.append(measure("naive: DICOM float64 chain + PIL + fp32 per image",
                           {"kind": "naive_dicom", "files": dicom_files[: args.naive], "model_onnx": fp32}))
    pngs = [str(data_dir / r["image"]) for r in rows[: args.naive * 4]]
    results.append(measure("naive: display PNG + fp32 per image",
                           {"kind": "naive_display", "pngs": pngs, "model_onnx": fp32}))
    print("flagger (INT8, batched, decode processes):", flush=True)
    # workers None = the flagger's default per input kind (flagger.core.decode_workers_for)
    configs = [(None, None)] + ([(1, None), (1, 1), (0, None)] if args.sweep else [])
    for workers, threads in configs:
        results.append(measure(f"flag DATA_DIR: workers={_auto(workers)} ort_threads={_auto(threads)}",
                               {"kind": "flag", "input_path": str(data_dir), "registry": str(registry),
                                "out_dir": str(work / f"out-data-{workers}-{threads}"), "workers": workers,
                                "ort_threads": threads, "batch_size": 32, "display_long_side": 1024}))
    for workers, threads in [(None, None)] + ([(1, None), (4, None)] if args.sweep else []):
        results.append(measure(f"flag DICOM folder end to end: workers={_auto(workers)} "
                               f"ort_threads={_auto(threads)}",
                               {"kind": "flag", "input_path": str(dicom_dir), "registry": str(registry),
                                "out_dir": str(work / f"out-dicom-{workers}"), "workers": workers,
                                "ort_threads": threads, "batch_size": 32, "display_long_side": 1024}))

    print("study-level output vs. the straightforward reference:", flush=True)
    ref, margin = reference_flags(data_dir, version.int8_path, version.spec)
    ours = flags_csv(work / "out-data-None-None" / "flags.csv", version.spec.classes)
    same = ours == ref
    per_class = ", ".join(f"{c} {sum(v[k] for v in ref.values())}" for k, c in enumerate(version.spec.classes))
    print(f"  flags.csv == reference: {same} ({len(ref)} studies; flagged: {per_class}; "
          f"closest probability to a threshold: {margin:.2e})", flush=True)

    print("memory flatness (4x the images):", flush=True)
    big_dir = work / "data-4x"
    if not big_dir.exists():
        shutil.copytree(data_dir, big_dir)
        grow_data_dir(big_dir, len(rows) * 4)
    results.append(measure("flag DATA_DIR x4: workers=auto",
                           {"kind": "flag", "input_path": str(big_dir), "registry": str(registry),
                            "out_dir": str(work / "out-data-4x"), "workers": None, "ort_threads": None,
                            "batch_size": 32, "display_long_side": 1024}))
    summary = {"model": MODEL, "input_size": INPUT_SIZE, "architecture": version.spec.architecture,
               "load_before_after": [None, os.getloadavg()], "results": results, "reference_equal": same,
               "reference_min_margin": margin}
    summary["load_before_after"][0] = load_before
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    if args.save:
        (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
        (REPO / "benchmarks" / "results" / "flagger.json").write_text(json.dumps(summary, indent=2))
    print(f"load average after: {os.getloadavg()}; results in {work / 'results.json'}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_run":
        _run_child(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
