"""The labeling pool at archive sizes 10k, 100k and 1M, beside today's design, in one run.

    nice .venv/bin/python benchmarks/bench_pool.py [--sizes 10000,100000,1000000] [--pool 2000] [--window 2000]
        [--rounds 2] [--versions 20] [--today 10000] [--model default|resnet18|tiny] [--workers 0,1]
    (MAMMOFLAG_POOL_ROUND_S in the environment sets the rounds' time budget; default 50 s)

What it does (Label Studio 1.23 on PostgreSQL 127.0.0.1:5432, with the fast prediction-import flag
mammoflag ships; the project's own code paths, in this process, as the worker runs them):
1. Writes a few hundred display PNGs (1024x832) and, per archive size, a simulated import
   DATA_DIR: a manifest.csv of N rows (5 vendors x 3 models, CC/MLO, L/R, 4 images a study)
   each naming its own file, a hard link to one of those PNGs (distinct paths, as the
   model-input cache sees a real archive).
2. Per size, in a child process (so its peak RSS is its own): a fresh project; the stratified cold
   start (``ensure_pool``); then ``--rounds`` new current versions, each one round of
   ``repredict_project`` (predict the pool, score the next archive window, swap, upload, switch,
   delete old versions' predictions). Reports each round's timings, ``/next`` latency (median of 5),
   the first Data Manager page of the score-ordered view (30 tasks), prediction rows, peak RSS.
3. ``--versions`` rounds with a tiny model whose bias changes (scores change) at the first size:
   prediction rows after that many versions.
4. Today's design at ``--today`` tasks: every archive image a task, ``repredict_project`` without a
   pool (predict all, upload, switch) for two versions.
The loop latency is retrain + queue + this round up to the project's switch (``to_switch_s``: deleting the
oldest version's predictions comes after it); the retrain figure is the measured one in
benchmarks/results/training.json (``retrain_500_labels_224px_end_to_end_s``), not re-measured here.
Results: benchmarks/results/pool.json, with ``uptime`` beside every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))  # factories.tiny_model_version

from mammoflag.datadir import MANIFEST_COLUMNS  # noqa: E402

VENDORS = [("HOLOGIC", "Selenia Dimensions"), ("HOLOGIC", "3Dimensions"), ("GE MEDICAL SYSTEMS", "Senographe"),
           ("GE MEDICAL SYSTEMS", "Pristina"), ("SIEMENS", "Mammomat Inspiration"), ("FUJIFILM", "Amulet"),
           ("AGFA", "DX-M")]


def load() -> str:
    return open("/proc/loadavg").read().split(" ")[0:3].__str__()


def write_images(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(n):
        img = rng.integers(0, 80, (1024, 832), dtype=np.uint8)
        img[:, :600] += 90
        img[400 + i % 300: 420 + i % 300, 300:320] = 40 + (i * 53) % 215  # a blob whose brightness varies
        p = root / "images" / f"{i:04d}" / "0.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)


def write_archive(folder: Path, n: int, n_images: int, src: str) -> None:
    """N manifest rows, each naming a file of its own: a hard link to one of the ``n_images`` PNGs (so
    every row is a distinct image path, as in a real archive, for the model-input cache, while the
    disk holds ``n_images`` images)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(MANIFEST_COLUMNS)
        for i in range(n):
            vendor, model = VENDORS[(i // 4) % len(VENDORS)]
            sop = f"1.2.826.0.{n}.{i}"
            os.link(folder.parent / src / "images" / f"{i % n_images:04d}" / "0.png", folder / "images" / f"{i}.png")
            row = {"key": f"{sop}:0", "image": f"images/{i}.png", "sop_instance_uid": sop,
                   "study_instance_uid": f"1.2.826.1.{n}.{i // 4}", "series_instance_uid": f"1.2.826.2.{n}.{i // 4}",
                   "frame": "0", "patient_key": f"{i // 8:032x}", "view_position": ("CC", "MLO")[i % 2],
                   "laterality": ("L", "R")[(i // 2) % 2], "view_modifiers": "", "image_type": "ORIGINAL|PRIMARY",
                   "presentation_intent": "FOR PRESENTATION", "manufacturer": vendor, "model": model,
                   "burned_in_annotation": "NO", "voi": "window:LINEAR", "rows": "4096", "cols": "3328"}
            w.writerow([row[c] for c in MANIFEST_COLUMNS])


def build_versions(models: Path, kind: str, n: int, spec_size: int) -> list[str]:
    """``n`` model versions (the last one current at the end); default (the network training makes by default,
    training/network.py) and resnet18 (the former default): one INT8 model copied ``n`` times."""
    from factories import tiny_model_version
    from label_config import load_label_config
    from mammoflag.spec import ModelSpec

    if kind == "tiny":
        spec = ModelSpec.from_label_config(load_label_config(), input_size=spec_size)
        return [tiny_model_version(models, spec, make_current=False, bias=-3.0 + (k % 7) * 0.5).name
                for k in range(n)]
    from mammoflag.card import stand_in_card
    from mammoflag.registry import Registry

    first = _build_default(models, spec_size) if kind == "default" else _build_resnet18(models, spec_size)
    reg = Registry(models)
    names = [first]
    for _ in range(n - 1):
        src = reg.get(first)
        with reg.staging() as tmp:
            for f in src.path.iterdir():
                if f.suffix == ".onnx":
                    shutil.copy(f, tmp / f.name)
            names.append(reg.publish(tmp, stand_in_card(src.spec, "benchmark copy", names[-1], int8_kept=True)).name)
    return names


def _publish_random(models: Path, spec, model, input_size: int, calib: np.ndarray) -> str:
    """Export ``model`` (random weights: speed only) + static INT8 as training does; register it; its name."""
    from mammoflag.card import stand_in_card
    from mammoflag.registry import FP32_FILE, INT8_FILE, Registry
    from training.export import export_onnx, quantize_static_int8

    reg = Registry(models)
    with reg.staging() as tmp:
        export_onnx(model, tmp / FP32_FILE, input_size)
        quantize_static_int8(tmp / FP32_FILE, tmp / INT8_FILE, calib)
        version = reg.publish(tmp, stand_in_card(spec, "benchmark: random weights, speed only", int8_kept=True))
    return version.name


def _build_default(models: Path, input_size: int) -> str:
    """The default network (random weights: speed only), exported + static INT8 as training does."""
    import torch

    from label_config import load_label_config
    from mammoflag.preprocess import model_input_batch
    from mammoflag.spec import ModelSpec
    from training.network import build_network

    spec = ModelSpec.from_label_config(load_label_config(), input_size=input_size)
    torch.manual_seed(0)
    model = build_network(spec.architecture, len(spec.classes)).eval()
    rng = np.random.default_rng(0)
    calib = model_input_batch([rng.integers(0, 255, (1024, 832), dtype=np.uint8) for _ in range(16)], input_size)
    return _publish_random(models, spec, model, input_size, calib)


def _build_resnet18(models: Path, input_size: int) -> str:
    """A ResNet18 (random weights: speed only) taking the preprocessing's channels, exported + INT8 as training does."""
    import torch
    from torch import nn
    from torchvision.models import resnet18

    from label_config import load_label_config
    from mammoflag.preprocess import CHANNELS
    from mammoflag.spec import ModelSpec
    from training.export import displays_to_inputs

    spec = ModelSpec.from_label_config(load_label_config(), input_size=input_size)
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=len(spec.classes)).eval()
    model.conv1 = nn.Conv2d(len(CHANNELS), 64, kernel_size=7, stride=2, padding=3, bias=False)
    rng = np.random.default_rng(0)
    calib = displays_to_inputs([rng.integers(0, 255, (256, 200), dtype=np.uint8) for _ in range(16)], input_size)
    return _publish_random(models, spec, model, input_size, calib)


def timed_get(url: str, token: str, n: int = 5) -> float:
    times = []
    with httpx.Client(headers={"Authorization": f"Token {token}"}, timeout=120) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.get(url)
            r.raise_for_status()
            times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 1)


def responsiveness(ls_url: str, token: str, pid: int, view_id: int) -> dict:
    return {"next_ms": timed_get(f"{ls_url}/api/projects/{pid}/next", token),
            "dm_first_page_ms": timed_get(f"{ls_url}/api/tasks?project={pid}&view={view_id}&page=1&page_size=30",
                                          token), "load": load()}


def child(args) -> int:
    """One archive size: cold start + rounds (pool), or today's design; prints one JSON line."""
    from label_config import load_label_config
    from mammoflag.labelstudio import iter_task_states, model_versions
    from mammoflag.registry import Registry
    from mammoflag.settings import Settings
    from ml_backend.setup_project import SCORE_ORDERING, ensure_pool
    from ml_backend.tasks import repredict_project
    from label_studio_sdk import LabelStudio

    env = {**os.environ, "MAMMOFLAG_POOL_SIZE": str(args.pool), "MAMMOFLAG_POOL_WINDOW": str(args.window),
           "MAMMOFLAG_POOL_WORKERS": str(args.workers)}
    settings = Settings.from_env(env)
    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_token.get(), timeout=600)
    xml = load_label_config().xml
    project = client.projects.create(title=f"bench {args.mode} {args.size} {uuid.uuid4().hex[:4]}", label_config=xml,
                                     sampling="Uncertainty sampling")
    view = client.views.create(project=project.id, data={"title": "Least certain first", "ordering": SCORE_ORDERING})
    archive = settings.data_root / f"archive-{args.size}"
    out: dict = {"mode": args.mode, "size": args.size, "pool": args.pool, "window": args.window,
                 "round_budget_s": settings.pool_round_s, "workers": settings.pool_workers or "auto",
                 "cpus": os.cpu_count(), "rounds": []}
    t = time.monotonic()
    if args.mode == "pool":
        fill = ensure_pool(client, settings, project.id, [archive])
        out["cold_start"] = {"s": round(time.monotonic() - t, 1), "added": fill.added, "load": load()}
    else:  # today's design: every archive image is a task
        from mammoflag.datadir import read_manifest, task_data_for_row

        batch = []
        for row in read_manifest(archive / "manifest.csv"):
            batch.append({"data": task_data_for_row(row, archive, settings.data_root)})
            if len(batch) == 1000:
                client.projects.import_tasks(project.id, request=batch)
                batch = []
        if batch:
            client.projects.import_tasks(project.id, request=batch)
        out["import_tasks"] = {"s": round(time.monotonic() - t, 1), "load": load()}
    registry = Registry(settings.models_dir)
    for name in args.versions.split(","):
        registry.set_current(name)
        t = time.monotonic()
        summary = repredict_project(client, settings, project.id, name)
        wall = time.monotonic() - t
        states = list(iter_task_states(client, project.id))
        rows = model_versions(client, project.id)
        out["rounds"].append({"version": name, "wall_s": round(wall, 1), "switched": summary["switched"],
                              "predicted": summary["predicted"], "timings": summary.get("timings"),
                              "pool": summary.get("pool"), "unlabeled": sum(not s.labelled for s in states),
                              "prediction_rows": sum(rows.values()), "versions_stored": len(rows), "load": load(),
                              **responsiveness(settings.label_studio_url, settings.label_studio_token.get(),
                                               project.id, view.id)})
        print(json.dumps(out["rounds"][-1]), file=sys.stderr, flush=True)
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    out["peak_rss_mb"] = _vm_hwm_mb()
    print(json.dumps(out), flush=True)
    return 0


def _vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_child(env: dict, mode: str, size: int, versions: list[str], a, workers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--size", str(size), "--pool", str(a.pool), "--window",
           str(a.window), "--child-workers", str(workers), "--child-versions", ",".join(versions)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"mode": mode, "size": size, "failed": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--versions", type=int, default=20, help="tiny-model rounds at the first size (0: skip)")
    ap.add_argument("--versions-pool", dest="versions_pool", type=int, default=500,
                    help="pool bound of the --versions run (its window is half of it)")
    ap.add_argument("--today", default="10000", help="sizes for today's design (empty: skip)")
    ap.add_argument("--model", default="default", choices=["default", "resnet18", "tiny"],
                    help="default: the network training makes by default; resnet18: the former default")
    ap.add_argument("--workers", default="0",
                    help="scoring processes per round, comma-separated (0: auto, one per core); every size runs "
                         "with the first, the first size also with each other one (beside it, same run)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pool.json")
    ap.add_argument("--label", default=None,
                    help="key of this run in the results file (other keys are kept); default: model, workers, date")
    ap.add_argument("--child", choices=["pool", "today"])
    ap.add_argument("--size", type=int)
    ap.add_argument("--child-versions", dest="child_versions")
    ap.add_argument("--child-workers", dest="child_workers", type=int, default=0)
    a = ap.parse_args()
    if a.child:
        a.mode, a.versions, a.workers = a.child, a.child_versions, a.child_workers
        return child(a)

    from mammoflag.label_studio_server import LabelStudioServer, PostgresConfig
    import psycopg

    a.label = a.label or f"{a.model}, scoring workers {a.workers}, {time.strftime('%Y-%m-%d %H:%M')}"
    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    data_root = work / "data"
    db = f"bench_pool_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    server = LabelStudioServer(work / "ls", data_root, "bench@mammoflag.test", secrets.token_urlsafe(12),
                               secrets.token_hex(20), postgres=PostgresConfig(db))
    sizes = [int(s) for s in a.sizes.split(",") if s]
    today = [int(s) for s in a.today.split(",") if s]
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": load(), "cpus": os.cpu_count(),
                     "model": a.model, "pool": a.pool, "window": a.window, "workers": a.workers, "runs": []}
    try:
        t = time.monotonic()
        write_images(data_root / "src", a.images)
        for n in sorted(set(sizes + today)):
            write_archive(data_root / f"archive-{n}", n, a.images, "src")
        results["setup_s"] = round(time.monotonic() - t, 1)
        server.start()
        env = {**os.environ, "MAMMOFLAG_HOME": str(work / "home"), "MAMMOFLAG_DATA_ROOT": str(data_root),
               "MAMMOFLAG_LABEL_STUDIO_URL": server.url, "MAMMOFLAG_LABEL_STUDIO_TOKEN": server.token,
               "PYTHONPATH": str(REPO / "tests")}
        from mammoflag.spec import DEFAULT_INPUT_SIZE

        size = {"resnet18": 224, "tiny": 64}.get(a.model, DEFAULT_INPUT_SIZE)
        env["MAMMOFLAG_INPUT_SIZE"] = str(size)
        workers = [int(w) for w in a.workers.split(",") if w]
        models = work / "models"
        names = build_versions(models, a.model, a.rounds * (len(sizes) + len(today) + len(workers) - 1), size)
        env["MAMMOFLAG_MODELS_DIR"] = str(models)
        k = 0
        for i, n in enumerate(sizes):
            for w in (workers if i == 0 else workers[:1]):
                results["runs"].append(run_child(env, "pool", n, names[k:k + a.rounds], a, w))
                k += a.rounds
            print(json.dumps(results["runs"][-1])[:1500], flush=True)
            _write(a.out, results, a.label)
        for n in today:
            results["runs"].append(run_child(env, "today", n, names[k:k + a.rounds], a, workers[0]))
            k += a.rounds
            print(json.dumps(results["runs"][-1])[:1500], flush=True)
            _write(a.out, results, a.label)
        if a.versions:
            tiny_models = work / "models-tiny"
            tiny = build_versions(tiny_models, "tiny", a.versions, 64)
            env20 = {**env, "MAMMOFLAG_MODELS_DIR": str(tiny_models), "MAMMOFLAG_INPUT_SIZE": "64"}
            small = argparse.Namespace(pool=a.versions_pool, window=max(1, a.versions_pool // 2))
            run = run_child(env20, "pool", sizes[0], tiny, small)
            run["note"] = f"{a.versions} versions (tiny model, bias varying so scores change)"
            results["versions_run"] = run
            print(json.dumps(run)[:1500], flush=True)
        training = json.loads((REPO / "benchmarks/results/training.json").read_text())
        retrain = training["summary"]["retrain_500_labels_224px_end_to_end_s"]
        results["loop_latency"] = {
            "retrain_s (benchmarks/results/training.json, 500 labels, 224 px, 2 cores)": retrain,
            "per_size": {f'{r["size"]} {r["mode"]} workers={r.get("workers")}': {
                "mode": r["mode"], "refresh_s_per_round": [x["wall_s"] for x in r["rounds"]],
                "to_switch_s_per_round": [(x.get("timings") or {}).get("to_switch_s") for x in r["rounds"]],
                "loop_s": [round(retrain + ((x.get("timings") or {}).get("to_switch_s") or x["wall_s"]), 1)
                           for x in r["rounds"]]}
                         for r in results["runs"] if "rounds" in r}}
    finally:
        results["load_end"] = load()
        _write(a.out, results, a.label)
        server.stop()
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _write(path: Path, results: dict, label: str) -> None:
    """``results`` under ``label`` in the results file; every other entry in it is kept."""
    from results_file import merge_results

    merge_results(label, results, path, {"cpus": os.cpu_count()})


if __name__ == "__main__":
    raise SystemExit(main())
