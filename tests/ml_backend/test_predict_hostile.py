"""Hostile /predict payloads: one bad task fails alone, oversized requests get 413, nothing logs a path.

The app runs in-process (FastAPI's TestClient) with a stand-in model, so these need no server and no
trained ONNX file: what is under test is the request and task handling around the model.
"""

from __future__ import annotations

import logging
import zlib
import struct
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mammoflag.paths import task_url_for
from mammoflag.settings import Settings
from ml_backend.app import create_app
from mlb_helpers import model_spec

AUTH = ("labelstudio", "hostile-password")


class StandInModel:
    """What predict_tasks needs of an OnnxClassifier: a spec, a name and probabilities."""

    def __init__(self):
        self.spec = model_spec()
        self.name = "stand-in-1"

    def probabilities(self, batch, header=None):
        return np.full((len(batch), len(self.spec.classes)), 0.5)


class StandInCurrent:
    def __init__(self):
        self.loaded = self.model = StandInModel()
        self.why_none = ""

    def get(self):
        return self.model


def huge_png(path: Path, width: int = 14_000, height: int = 14_000) -> Path:
    """A valid greyscale PNG declaring 196 megapixels in a few hundred KB (one zlib stream of zero rows)."""
    raw = zlib.compress(b"\x00" * (width + 1) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def client(tmp_path):
    data_root = tmp_path / "data"
    (data_root / "imp").mkdir(parents=True)
    env = {"MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_DATA_ROOT": str(data_root),
           "MAMMOFLAG_MODELS_DIR": str(tmp_path / "models"), "MAMMOFLAG_BACKEND_PASSWORD": AUTH[1],
           "MAMMOFLAG_WEBHOOK_SECRET": "hostile-webhook", "MAMMOFLAG_BACKEND_USER": AUTH[0]}
    app = create_app(Settings.from_env(env), enqueue=lambda name, args: "job-1", max_request_bytes=256 * 1024,
                     max_tasks=50)
    with TestClient(app) as c:
        app.state.model = StandInCurrent()
        c.data_root = data_root
        yield c


def good_task(data_root: Path, i: int) -> dict:
    png = data_root / "imp" / f"{i}.png"
    Image.fromarray(np.full((40, 30), 100, dtype=np.uint8)).save(png)
    return {"id": i, "data": {"image": task_url_for(png, data_root)}}


def test_each_bad_task_fails_alone(client, caplog):
    root = client.data_root
    huge = huge_png(root / "imp" / "huge.png")
    assert huge.stat().st_size < 1_000_000
    long_name = "Doe^Jane-" + "x" * 5000 + ".png"
    bad = [
        {"id": 1, "data": {"image": "/data/local-files/?d=imp/0.png%00.txt"}},
        {"id": 2, "data": {"image": f"/data/local-files/?d=imp/{long_name}"}},
        {"id": 3, "data": {"image": task_url_for(huge, root)}},
        {"id": 4, "data": "a string"},
        {"id": 5, "data": ["a", "list"]},
        {"id": 6},
        "not an object",
        {"id": "=cmd|' /C calc'!A0", "data": {"image": 7}},
    ]
    tasks = [good_task(root, 100)] + bad + [good_task(root, 101)]
    with caplog.at_level(logging.DEBUG):
        r = client.post("/predict", json={"tasks": tasks}, auth=AUTH)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)
    assert "result" in results[0] and "result" in results[-1]  # the good ones are predicted
    for res in results[1:-1]:
        assert "error" in res and "result" not in res, res
    assert "too large" in results[3]["error"]
    logged = caplog.text
    for leak in ("Doe^Jane", "xxxxxxxxxx", str(root), "%00", "=cmd"):
        assert leak not in logged and leak not in r.text, leak


def test_oversized_requests_get_413_naming_the_limit(client):
    many = [{"id": i, "data": {}} for i in range(51)]
    r = client.post("/predict", json={"tasks": many}, auth=AUTH)
    assert r.status_code == 413 and "at most 50 tasks" in r.json()["detail"]
    big = {"tasks": [{"id": 1, "data": {"image": "x" * 300_000}}]}
    r = client.post("/predict", json=big, auth=AUTH)
    assert r.status_code == 413 and "262144 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it streams
        for _ in range(40):
            yield b" " * 10_000

    r = client.post("/predict", content=chunks(), auth=AUTH, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_many_failing_tasks_log_a_few_lines_not_one_each(client, caplog):
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d=imp/missing-{i}.png"}} for i in range(50)]
    with caplog.at_level(logging.WARNING):
        r = client.post("/predict", json={"tasks": tasks}, auth=AUTH)
    assert r.status_code == 200 and len(r.json()["results"]) == 50
    assert len(caplog.records) < 10


def test_no_credentials_no_service(client):
    assert client.post("/predict", json={"tasks": []}).status_code == 401
    assert client.get("/health").status_code == 401
    assert client.get("/health", auth=AUTH).status_code == 200
