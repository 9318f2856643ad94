"""Helpers of the ML backend tests: tiny display PNGs under the data root, the model spec, and the
backend itself as a real uvicorn process (``mammoflag serve-backend``) on a free loopback port."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from label_config import load_label_config
from mammoflag.label_studio_server import free_port
from mammoflag.paths import task_url_for
from mammoflag.processes import stop_process_groups
from mammoflag.spec import ModelSpec

REPO = Path(__file__).resolve().parents[2]
INPUT_SIZE = 64


def write_display(path: Path, bright: int, seed: int, size: tuple[int, int] = (96, 64)) -> Path:
    """A small grey 'mammogram': dim noise, with a bright blob (a stand-in for a marker) when bright is high."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=size, dtype=np.uint8)
    img[40:48, 20:28] = bright
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def make_tasks(data_root: Path, folder: str, brightness: list[int], studies: list[str] | None = None) -> list[dict]:
    """Label Studio task dicts (data only) for PNGs written below data_root/folder."""
    tasks = []
    for i, bright in enumerate(brightness):
        png = write_display(data_root / folder / "images" / f"{i:03d}" / "0.png", bright, seed=i)
        study = studies[i] if studies else f"1.2.826.0.1.{folder}.{i}"
        tasks.append({"data": {"image": task_url_for(png, data_root), "key": f"{folder}-{i}:0",
                               "study_instance_uid": study, "study_label": f"s{i:03d}",
                               "view_position": "CC", "laterality": "L"}})
    return tasks


def model_spec(input_size: int = INPUT_SIZE) -> ModelSpec:
    return ModelSpec.from_label_config(load_label_config(), input_size=input_size)


@dataclass
class BackendProcess:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen
    log_path: Path
    auth: tuple[str, str] = field(repr=False)
    webhook_secret: str = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, auth=kw.pop("auth", self.auth), timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, auth=kw.pop("auth", self.auth), timeout=kw.pop("timeout", 30), **kw)


def start_backend(env: dict[str, str], log_path: Path, timeout_s: float = 60) -> BackendProcess:
    """Run ``mammoflag serve-backend`` on a free loopback port and wait until /health answers."""
    port = free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mammoflag.cli", "serve-backend", "--host", "127.0.0.1",
                             "--port", str(port)], env={**os.environ, **env}, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    auth = (env["MAMMOFLAG_BACKEND_USER"], env["MAMMOFLAG_BACKEND_PASSWORD"])
    backend = BackendProcess(f"http://127.0.0.1:{port}", env, proc, log_path, auth, env["MAMMOFLAG_WEBHOOK_SECRET"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}:\n{backend.log()[-3000:]}")
        try:
            if backend.get("/health", timeout=2).status_code == 200:
                return backend
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_backend(backend)
    raise TimeoutError(f"backend did not answer within {timeout_s}s:\n{backend.log()[-3000:]}")


def stop_backend(backend: BackendProcess) -> None:
    stop_process_groups([backend.proc], timeout_s=15)


def backend_environment(home: Path, data_root: Path, broker_url: str, **extra: str) -> dict[str, str]:
    return {
        "MAMMOFLAG_HOME": str(home),
        "MAMMOFLAG_DATA_ROOT": str(data_root),
        "MAMMOFLAG_MODELS_DIR": str(home / "models"),
        "MAMMOFLAG_BACKEND_USER": "labelstudio",
        "MAMMOFLAG_BACKEND_PASSWORD": secrets.token_urlsafe(16),
        "MAMMOFLAG_WEBHOOK_SECRET": secrets.token_urlsafe(16),
        "MAMMOFLAG_BROKER_URL": broker_url,
        "MAMMOFLAG_RESULT_BACKEND": broker_url,
        "MAMMOFLAG_INPUT_SIZE": str(INPUT_SIZE),
        "MAMMOFLAG_DISPLAY_LONG_SIDE": "256",
        "MAMMOFLAG_LOG_LEVEL": "INFO",
        **extra,
    }


def setup_project(env: dict[str, str], title: str) -> int:
    """Run ``mammoflag setup-project`` as a user would; return the project id it printed."""
    return int(run_setup_project(env, title).split()[1].rstrip(":"))


def run_setup_project(env: dict[str, str], title: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mammoflag.cli", "setup-project", "--project", title],
                         env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def import_tasks(ls_client, project_id: int, tasks: list[dict]) -> list[int]:
    return list(ls_client.projects.import_tasks(project_id, request=tasks, return_task_ids=True).task_ids)


def next_task_id(label_studio, project_id: int) -> int:
    r = httpx.get(f"{label_studio.url}/api/projects/{project_id}/next",
                  headers={"Authorization": f"Token {label_studio.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def predictions_by_task(ls_client, project_id: int, version: str) -> dict[int, list]:
    out: dict[int, list] = {}
    for p in ls_client.predictions.list(project=project_id):
        if p.model_version == version:
            out.setdefault(p.task, []).append(p)
    return out
