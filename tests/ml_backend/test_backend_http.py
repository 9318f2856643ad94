"""The ML backend over HTTP, as a real uvicorn process with a real ONNX model and real Redis."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from factories import tiny_model_version
from mammoflag.registry import Registry
from mlb_helpers import backend_environment, make_tasks, model_spec

pytestmark = pytest.mark.services


@pytest.fixture
def env(tmp_path, data_root, redis_url):
    return backend_environment(tmp_path / "home", data_root, redis_url)


def queued(redis_url: str, queue: str) -> list[tuple[str, list]]:
    """(task name, args) of the Celery messages waiting in a Redis queue (kombu keeps a list per queue)."""
    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):  # kombu LPUSHes and BRPOPs: oldest last
        msg = json.loads(raw)
        args = json.loads(base64.b64decode(msg["body"]))[0]
        out.append((msg["headers"]["task"], args))
    return out


def test_predict_answers_every_task_with_choices_score_and_probabilities(env, data_root, backend_factory):
    version = tiny_model_version(Path(env["MAMMOFLAG_MODELS_DIR"]), model_spec())
    backend = backend_factory(env)
    tasks = make_tasks(data_root, "http-predict", [255, 150, 20])
    tasks += [
        {"data": {"image": "/data/local-files/?d=../../etc/passwd"}},  # escapes the data root
        {"data": {"image": "http://169.254.169.254/latest/meta-data"}},  # never fetched
        {"data": {"image": "/data/local-files/?d=http-predict/images/Doe%5EJane/0.png"}},  # no such file
        {"data": {"other": 1}},  # no image field at all
    ]
    for i, t in enumerate(tasks):
        t["id"] = 100 + i
    r = backend.post("/predict", json={"tasks": tasks, "project": "1.1700000000", "label_config": "", "params": {}})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)

    bright, unsure, dim = results[:3]
    assert bright["result"][0]["value"]["choices"] == ["biopsy_tool", "mag_view"]
    assert dim["result"][0]["value"]["choices"] == ["neither"]
    for res in (bright, unsure, dim):
        item = res["result"][0]
        assert (item["from_name"], item["to_name"], item["type"]) == ("findings", "image", "choices")
        assert res["model_version"] == version.name
        p = np.array([res["probabilities"]["biopsy_tool"], res["probabilities"]["mag_view"]])
        entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        assert res["score"] == pytest.approx(1 - entropy.max(), abs=1e-5)
    # the mid-grey blob is what this model is least sure about: lowest score
    assert unsure["score"] < min(bright["score"], dim["score"])

    errors = [res["error"] for res in results[3:]]
    assert all("result" not in res for res in results[3:])
    assert "task 103" in errors[0] and "refused" in errors[0]
    assert "task 104" in errors[1] and "refused" in errors[1]
    assert "task 105" in errors[2] and "does not exist" in errors[2]
    assert "task 106" in errors[3] and "data.image" in errors[3]
    # the URL (which could carry a name) is never echoed back, nor logged
    assert not any("Doe" in e or "passwd" in e for e in errors)
    time.sleep(0.2)
    assert "Doe" not in backend.log() and "passwd" not in backend.log()


def test_requests_without_credentials_or_with_wrong_secret_are_refused(env, data_root, backend_factory):
    backend = backend_factory(env)
    secret_payload = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "note": "PATIENT^SECRET-NAME"}
    calls = [("get", "/health", {}), ("post", "/setup", {"json": {"project": "1.1"}}),
             ("post", "/predict", {"json": {"tasks": []}}), ("get", "/versions", {})]
    for method, path, kw in calls:
        for auth in (None, ("labelstudio", "wrong-password"), ("someone", env["MAMMOFLAG_BACKEND_PASSWORD"])):
            r = getattr(backend, method)(path, auth=auth, **kw)
            assert r.status_code == 401, (path, auth)
        assert getattr(backend, method)(path, **kw).status_code == 200, path

    hook = backend.url + "/webhook"
    assert httpx.post(hook, json=secret_payload).status_code == 401
    assert httpx.post(hook, json=secret_payload, headers={"X-Mammoflag-Webhook-Secret": "nope"}).status_code == 401
    # a wrong secret header is refused even with good basic auth
    assert httpx.post(hook, json=secret_payload, auth=backend.auth,
                      headers={"X-Mammoflag-Webhook-Secret": "nope"}).status_code == 401
    time.sleep(0.2)
    log = backend.log()
    assert log.count("401 POST /webhook") == 3 and "401 GET /health" in log
    assert "SECRET-NAME" not in log and env["MAMMOFLAG_WEBHOOK_SECRET"] not in log


def test_webhook_enqueues_retrain_and_repredict_within_a_second(env, data_root, backend_factory, redis_url):
    version = tiny_model_version(Path(env["MAMMOFLAG_MODELS_DIR"]), model_spec())
    backend = backend_factory(env)
    headers = {"X-Mammoflag-Webhook-Secret": env["MAMMOFLAG_WEBHOOK_SECRET"]}
    def hook(payload, **kw):
        t0 = time.perf_counter()
        r = httpx.post(backend.url + "/webhook", json=payload, timeout=5, **kw)
        return r, time.perf_counter() - t0

    for i, action in enumerate(("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")):
        r, took = hook({"action": action, "project": {"id": 7}, "annotation": {"id": 1}}, headers=headers)
        assert r.status_code == 202 and r.json()["jobs"][0]["task"] == "mammoflag.retrain", r.text
        # one retrain waits in the queue: later annotations ride on it (it reads them all when it starts)
        assert bool(r.json()["jobs"][0].get("already_queued")) == (i > 0), r.text
        assert took < 1.0
    # "Start training" comes from Label Studio's ML connector: basic auth, no secret header; forced
    r, _ = hook({"action": "START_TRAINING", "project": {"id": 7, "title": "x"}}, auth=backend.auth)
    assert r.status_code == 202
    r, _ = hook({"action": "TASKS_CREATED", "project": {"id": 7}, "tasks": [{"id": 1}]}, headers=headers)
    assert r.status_code == 202
    r, _ = hook({"action": "PROJECT_UPDATED", "project": {"id": 7}}, headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    r, _ = hook({"action": "ANNOTATION_CREATED"}, headers=headers)
    assert r.status_code == 400 and "project.id" in r.text

    assert queued(redis_url, "training") == [("mammoflag.retrain", [7, False]), ("mammoflag.retrain", [7, True])]
    assert queued(redis_url, "predict") == [("mammoflag.repredict", [7, version.name])]


def test_no_model_answers_empty_then_new_versions_are_picked_up(env, data_root, backend_factory):
    backend = backend_factory(env)
    tasks = make_tasks(data_root, "http-swap", [255, 20])
    r = backend.post("/predict", json={"tasks": tasks})
    assert r.json() == {"results": [{"result": [], "model_version": "no-model-yet"}] * 2}
    assert "no current version" in backend.log()
    assert backend.post("/setup", json={"project": "1.1"}).json() == {"model_version": None}

    models = Path(env["MAMMOFLAG_MODELS_DIR"])
    first = tiny_model_version(models, model_spec())
    assert _wait_for_version(backend, first.name)
    r = backend.post("/predict", json={"tasks": tasks}).json()["results"]
    assert [x["model_version"] for x in r] == [first.name] * 2

    # a newer version with a different bias: swapped in without a restart, scores change
    second = tiny_model_version(models, model_spec(), bias=-6.0)
    assert _wait_for_version(backend, second.name)
    r2 = backend.post("/predict", json={"tasks": tasks}).json()["results"]
    assert [x["model_version"] for x in r2] == [second.name] * 2
    assert r2[0]["probabilities"]["biopsy_tool"] < r[0]["probabilities"]["biopsy_tool"]
    assert backend.log().count("loaded model") == 2  # each version loaded once, never per request

    v = backend.get("/versions").json()
    assert v == {"versions": [first.name, second.name], "current": second.name}
    assert backend.post("/setup", json={"project": "1.1", "schema": model_spec_schema()}).json() == \
        {"model_version": second.name}
    bad = model_spec_schema().replace('value="mag_view"', 'value="spot_view"')
    r = backend.post("/setup", json={"project": "1.1", "schema": bad})
    assert r.status_code == 400 and "mag_view" in r.json()["error"]

    # a broken current version is refused; the backend keeps serving the one it has
    broken = models / "v0099-broken"
    broken.mkdir()
    (broken / "model.json").write_text(json.dumps({"version": "v0099-broken", "spec": {**model_spec().to_json(),
                                                   "classes": ["other"]}}))
    Registry(models).set_current("v0099-broken")
    time.sleep(2.5)
    assert backend.post("/predict", json={"tasks": tasks[:1]}).json()["results"][0]["model_version"] == second.name
    assert "v0099-broken cannot be used" in backend.log()


def model_spec_schema() -> str:
    from label_config import load_label_config

    return load_label_config().xml


def _wait_for_version(backend, name: str, timeout_s: float = 10) -> bool:
    """Poll /setup (which, like /predict, picks up a moved `current` pointer; /health only reports)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if backend.post("/setup", json={"project": "1.1"}).json()["model_version"] == name:
            return True
        time.sleep(0.3)
    return False
