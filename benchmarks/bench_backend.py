"""ML backend latency and throughput over real HTTP (loopback only, bounded loops).

    nice .venv/bin/python benchmarks/bench_backend.py [--requests 200] [--concurrency 1,2,4,8] [--no-int8]

What it does:
1. Builds the default network of training/network.py (``--model resnet18``: torchvision's ResNet18,
   the former default, at ``--input-size 224``), random weights (speed does not depend on them), at
   the default input size, exports it with training's exporter and, unless ``--no-int8``,
   quantizes it to static INT8 with training's quantizer; registers it as the current version
   of a temporary registry (INT8 marked kept, as training does when it keeps accuracy).
2. Writes display PNGs at the importer's display size (long side 1024) under a temporary data root.
3. Starts ``mammoflag serve-backend`` (uvicorn, one process) on a free loopback port.
4. Measures, with httpx against that process:
   - single-task ``/predict`` latency, sequential requests: p50 / p95 / max (target p95 <= 150 ms);
   - throughput with N concurrent single-task clients (threads), tasks/s and p95 per request;
   - throughput of batched requests (16 tasks per ``/predict``, as Label Studio sends batches).
Figures are printed and written to ``benchmarks/results/backend.json``. The machine's load
average is printed before and after: other work on the same cores slows everything.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from label_config import load_label_config  # noqa: E402
from mammoflag.card import stand_in_card  # noqa: E402
from mammoflag.label_studio_server import free_port  # noqa: E402
from mammoflag.paths import task_url_for  # noqa: E402
from mammoflag.processes import stop_process_groups  # noqa: E402
from mammoflag.registry import FP32_FILE, INT8_FILE, Registry  # noqa: E402
from mammoflag.spec import DEFAULT_INPUT_SIZE, ModelSpec  # noqa: E402


def build_model(models_dir: Path, input_size: int, int8: bool, kind: str = "default") -> str:
    import torch
    from torchvision.models import resnet18

    from training.export import displays_to_inputs, export_onnx, quantize_static_int8
    from training.network import build_network

    spec = ModelSpec.from_label_config(load_label_config(), input_size=input_size)
    torch.manual_seed(0)
    if kind == "resnet18":
        class FirstThreePlanes(torch.nn.Module):  # the model input's area, max and top-hat planes
            def forward(self, x):
                return x[:, :3]

        model = torch.nn.Sequential(FirstThreePlanes(), resnet18(weights=None, num_classes=len(spec.classes))).eval()
        spec = replace(spec, architecture="resnet18")
    else:
        model = build_network(spec.architecture, len(spec.classes)).eval()
    reg = Registry(models_dir)
    with reg.staging() as tmp:
        export_onnx(model, tmp / FP32_FILE, input_size)
        kept = False
        if int8:
            rng = np.random.default_rng(0)
            calib = displays_to_inputs([rng.integers(0, 255, (256, 200), dtype=np.uint8) for _ in range(16)],
                                       input_size)
            quantize_static_int8(tmp / FP32_FILE, tmp / INT8_FILE, calib)
            kept = True
        version = reg.publish(tmp, stand_in_card(spec, "benchmark: random weights, speed only", int8_kept=kept))
    reg.set_current(version.name)
    return version.name


def write_displays(data_root: Path, n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    tasks = []
    for i in range(n):
        img = rng.integers(0, 80, (1024, 832), dtype=np.uint8)
        img[:, :600] += 90  # a breast-shaped bright region
        png = data_root / "bench" / "images" / f"{i:03d}" / "0.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(png)
        tasks.append({"id": i + 1, "data": {"image": task_url_for(png, data_root)}})
    return tasks


def start_backend(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mammoflag.cli", "serve-backend", "--port", str(port)],
                            env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    auth = (env["MAMMOFLAG_BACKEND_USER"], env["MAMMOFLAG_BACKEND_PASSWORD"])
    for _ in range(200):
        try:
            if httpx.get(url + "/health", auth=auth, timeout=2).json().get("model_version"):
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    stop_process_groups([proc], timeout_s=15)
    raise RuntimeError(f"backend did not start; see {log_path}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def sequential(client: httpx.Client, tasks: list[dict], n: int) -> dict:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post("/predict", json={"tasks": [tasks[i % len(tasks)]]})
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200 and "score" in r.json()["results"][0], r.text
    return {"requests": n, "p50_ms": round(percentile(times, 50), 1), "p95_ms": round(percentile(times, 95), 1),
            "max_ms": round(max(times), 1), "mean_ms": round(statistics.mean(times), 1)}


def concurrent(url: str, auth, tasks: list[dict], clients: int, per_client: int, batch: int = 1) -> dict:
    times: list[float] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        with httpx.Client(base_url=url, auth=auth, timeout=60) as c:
            for i in range(per_client):
                start = (k * per_client + i) * batch
                body = {"tasks": [tasks[(start + j) % len(tasks)] for j in range(batch)]}
                t0 = time.perf_counter()
                r = c.post("/predict", json=body)
                dt = (time.perf_counter() - t0) * 1000
                assert r.status_code == 200 and len(r.json()["results"]) == batch
                with lock:
                    times.append(dt)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n_tasks = clients * per_client * batch
    return {"clients": clients, "tasks_per_request": batch, "requests": len(times), "wall_s": round(wall, 2),
            "tasks_per_s": round(n_tasks / wall, 1), "p50_ms": round(percentile(times, 50), 1),
            "p95_ms": round(percentile(times, 95), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="sequential single-task requests (default 200)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="concurrent client counts (default 1,2,4,8)")
    ap.add_argument("--per-client", type=int, default=40, help="requests per concurrent client (default 40)")
    ap.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE)
    ap.add_argument("--model", choices=["default", "resnet18"], default="default")
    ap.add_argument("--no-int8", action="store_true", help="serve the fp32 model only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "backend.json")
    args = ap.parse_args()

    print(f"load average before: {os.getloadavg()}; cpus: {os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    models, data_root = work / "models", work / "data"
    version = build_model(models, args.input_size, int8=not args.no_int8, kind=args.model)
    tasks = write_displays(data_root, 24)
    env = {"MAMMOFLAG_HOME": str(work), "MAMMOFLAG_DATA_ROOT": str(data_root), "MAMMOFLAG_MODELS_DIR": str(models),
           "MAMMOFLAG_BACKEND_USER": "bench", "MAMMOFLAG_BACKEND_PASSWORD": secrets.token_urlsafe(16),
           "MAMMOFLAG_WEBHOOK_SECRET": secrets.token_urlsafe(16), "MAMMOFLAG_LOG_LEVEL": "WARNING"}
    proc, url = start_backend(env, work / "backend.log")
    auth = (env["MAMMOFLAG_BACKEND_USER"], env["MAMMOFLAG_BACKEND_PASSWORD"])
    results: dict = {"model": args.model, "input_size": args.input_size, "int8": not args.no_int8,
                     "version": version, "display": "1024x832 PNG", "cpus": os.cpu_count()}
    try:
        with httpx.Client(base_url=url, auth=auth, timeout=60) as client:
            for i in range(10):  # warm-up: ONNX Runtime allocations, PIL, connection
                client.post("/predict", json={"tasks": [tasks[i]]})
            results["single_task"] = sequential(client, tasks, args.requests)
        print("single task, sequential:", results["single_task"])
        results["concurrent"] = []
        for k in (int(x) for x in args.concurrency.split(",")):
            row = concurrent(url, auth, tasks, k, max(4, args.per_client // k))
            results["concurrent"].append(row)
            print("concurrent single-task clients:", row)
        row = concurrent(url, auth, tasks, 2, 8, batch=16)
        results["batched"] = row
        print("batched (16 tasks per request, 2 clients):", row)
    finally:
        stop_process_groups([proc], timeout_s=15)
    print(f"load average after: {os.getloadavg()}")
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
