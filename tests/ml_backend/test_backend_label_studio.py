"""The ML backend with a real Label Studio, real Redis and a real Celery worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from factories import tiny_model_version
from mammoflag.settings import Settings
from mlb_helpers import backend_environment, import_tasks, make_tasks, model_spec, next_task_id, predictions_by_task, run_setup_project, \
    setup_project

pytestmark = [pytest.mark.label_studio, pytest.mark.services]


def test_setup_project_connects_the_backend_and_is_idempotent(stack, ls_client):
    pid = setup_project(stack.env, "mlb setup")
    assert setup_project(stack.env, "mlb setup") == pid  # second run: same project, nothing doubled

    backends = ls_client.ml.list(project=pid)
    assert len(backends) == 1 and backends[0].url == stack.url
    assert backends[0].state == "CO" and backends[0].auth_method == "BASIC_AUTH"  # /health and /setup passed
    assert "setup from Label Studio for project" in stack.log()

    hooks = [w for w in ls_client.webhooks.list(project=str(pid)) if w.url.startswith(stack.url)]
    assert len(hooks) == 1  # ours; Label Studio's own all-actions webhook was never made
    assert hooks[0].headers == {"X-Mammoflag-Webhook-Secret": stack.env["MAMMOFLAG_WEBHOOK_SECRET"]}
    assert not hooks[0].send_for_all_actions and "ANNOTATION_CREATED" in hooks[0].actions

    project = ls_client.projects.get(pid)
    assert project.sampling == "Uncertainty sampling"
    # no prediction carries the version yet, so Label Studio refuses it: a repredict job is queued
    assert f"model_version {stack.version.name} pending: repredict job" in run_setup_project(stack.env, "mlb setup")
    views = [v for v in ls_client.views.list(project=pid) if (v.data or {}).get("title") == "Least certain first"]
    assert len(views) == 1 and views[0].data["ordering"] == ["tasks:predictions_score"]


def test_imported_tasks_get_predictions_and_next_is_the_least_certain(stack, ls_client, label_studio, data_root,
                                                                      redis_url):
    tasks = make_tasks(data_root, "mlb-predict", [255, 160, 20, 140, 230])
    pid = setup_project(stack.env, "mlb predict")
    tasks.append({"data": {"image": "/data/local-files/?d=../outside.png", "study_instance_uid": "x"}})
    ids = import_tasks(ls_client, pid, tasks)
    redis.Redis.from_url(redis_url).delete("predict")  # TASKS_CREATED queued a repredict; no worker here

    # Label Studio calls /predict (the Data Manager action "Retrieve predictions")
    ls_client.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    preds = predictions_by_task(ls_client, pid, stack.version.name)
    assert sorted(preds) == sorted(ids[:5])  # every good task, once; the bad one got none
    assert all(len(p) == 1 and p[0].score is not None for p in preds.values())
    assert f"task {ids[5]}: data.image is not a /data/local-files/ URL below the data root" in stack.log()
    choices = {t: p[0].result[0]["value"]["choices"] for t, p in preds.items()}
    assert choices[ids[0]] == ["biopsy_tool", "mag_view"] and choices[ids[2]] == ["neither"]

    # now predictions carry the version: setup-project can point the project at it
    assert f"model_version {stack.version.name}\n" in run_setup_project(stack.env, "mlb predict")
    assert ls_client.projects.get(pid).model_version == stack.version.name
    least_certain = min(preds, key=lambda t: preds[t][0].score)
    assert next_task_id(label_studio, pid) == least_certain


def test_repredict_worker_uploads_then_switches_model_version(stack, ls_client, label_studio, data_root, tmp_path,
                                                              celery_worker_factory, redis_url):
    from mammoflag.jobs import create_app as create_celery_app

    # The worker gets a registry of its own (so the backend's model stays put for the other tests).
    env = {**stack.env, "MAMMOFLAG_MODELS_DIR": str(tmp_path / "models")}
    # two studies with three near-identical views each, and three single-image studies
    brightness = [150, 152, 154, 140, 141, 142, 255, 20, 200]
    studies = ["A", "A", "A", "B", "B", "B", "C", "D", "E"]
    tasks = make_tasks(data_root, "mlb-repredict", brightness, studies)
    pid = setup_project(stack.env, "mlb repredict")
    ids = import_tasks(ls_client, pid, tasks)
    ls_client.annotations.create(ids[8], result=[{"from_name": "findings", "to_name": "image", "type": "choices",
                                                  "value": {"choices": ["neither"]}}])
    redis.Redis.from_url(redis_url).delete("predict")

    models = Path(env["MAMMOFLAG_MODELS_DIR"])
    old = tiny_model_version(models, model_spec())
    celery_worker_factory(env, queues="predict")
    celery = create_celery_app(Settings.from_env(env))
    first = celery.send_task("mammoflag.repredict", args=[pid, old.name]).get(timeout=180)
    assert first["switched"] and first["predicted"] == 8

    new = tiny_model_version(models, model_spec(), bias=-1.0)
    stale = celery.send_task("mammoflag.repredict", args=[pid, old.name]).get(timeout=180)
    assert "skipped" in stale and not stale["switched"]  # never move a project back to an older model

    summary = celery.send_task("mammoflag.repredict", args=[pid, new.name]).get(timeout=180)
    assert summary["switched"] and summary["predicted"] == 8 and summary["groups"] == 4
    assert ls_client.projects.get(pid).model_version == new.name

    preds = predictions_by_task(ls_client, pid, new.name)
    assert sorted(preds) == sorted(ids[:8])  # the annotated task is not re-predicted
    score = {t: p[0].score for t, p in preds.items()}
    # diversity: one member per study in the first third of the score range, the others queue behind
    # every single-image study: the first four tasks served come from four different studies
    for members in (ids[0:3], ids[3:6]):
        assert sorted(int(score[t] * 3) for t in members) == [0, 1, 2]
    first_four = sorted(score, key=score.get)[:4]
    assert {studies[ids.index(t)] for t in first_four} == {"A", "B", "C", "D"}
    assert next_task_id(label_studio, pid) == min(score, key=score.get)

    # new tasks arrive (TASKS_CREATED re-runs the job for the served version): only they are predicted
    [extra] = import_tasks(ls_client, pid, make_tasks(data_root, "mlb-repredict-more", [180]))
    again = celery.send_task("mammoflag.repredict", args=[pid, new.name]).get(timeout=180)
    assert again["predicted"] == 1 and again["already_predicted"] == 8
    preds = predictions_by_task(ls_client, pid, new.name)
    assert sorted(preds) == sorted(ids[:8] + [extra]) and all(len(p) == 1 for p in preds.values())


@pytest.mark.slow
def test_annotations_by_two_users_retrain_and_rescore(label_studio, ls_client, imported_cohort, synthetic_cohort,
                                                      data_root, tmp_path, redis_url, backend_factory,
                                                      celery_worker_factory):
    """Two readers annotate -> webhooks -> retrain (training's task, in a real worker) -> a new current
    version -> repredict uploads re-scored predictions -> the project's model_version follows."""
    import json

    from ls_helpers import annotate_from_truth, ensure_annotators, truth_by_key
    from mammoflag.registry import Registry

    # a registry of its own, empty: the backend starts with no model at all
    env = backend_environment(tmp_path / "home", data_root, redis_url, MAMMOFLAG_LABEL_STUDIO_URL=label_studio.url,
                              MAMMOFLAG_LABEL_STUDIO_TOKEN=label_studio.token, MAMMOFLAG_RETRAIN_MIN_NEW="40",
                              MAMMOFLAG_TRAIN_LR="0.003", MAMMOFLAG_TRAIN_EPOCHS="2",
                              MAMMOFLAG_TRAIN_QUANTIZE_INT8="false", MAMMOFLAG_TRAIN_THREADS="1",
                              MAMMOFLAG_TRAIN_PRETEXT_STEPS="40")
    backend = backend_factory(env)
    env["MAMMOFLAG_BACKEND_URL"] = backend.url
    pid = setup_project(env, "mlb end to end")
    tasks = json.loads((imported_cohort / "tasks.json").read_text())
    ids = import_tasks(ls_client, pid, tasks)
    assert backend.post("/predict", json={"tasks": [{"id": ids[0], "data": tasks[0]["data"]}]}).json() == \
        {"results": [{"result": [], "model_version": "no-model-yet"}]}  # no model yet

    # both queues: retrain, then the repredict it sends (a worker without -Q serves only "training")
    celery_worker_factory(env, queues="training,predict")
    readers = ensure_annotators(ls_client, ["mlb-reader-1", "mlb-reader-2"])
    spec = model_spec()
    annotated = annotate_from_truth(ls_client, pid, truth_by_key(synthetic_cohort[1]), spec, readers,
                                    limit=32)
    assert "ANNOTATION_CREATED -> enqueued mammoflag.retrain" in backend.log()

    registry = Registry(env["MAMMOFLAG_MODELS_DIR"])
    deadline = time.monotonic() + 600
    version = None
    while time.monotonic() < deadline:
        version = registry.current_name()
        if version and ls_client.projects.get(pid).model_version == version:
            break
        time.sleep(3)
    assert version and ls_client.projects.get(pid).model_version == version, "no retrain/repredict finished in time"

    preds = predictions_by_task(ls_client, pid, version)
    unlabeled = set(ids) - set(annotated)
    assert set(preds) == unlabeled and all(p[0].score is not None for p in preds.values())
    # the backend swapped to the new version by itself
    deadline = time.monotonic() + 10
    while backend.post("/setup", json={}).json()["model_version"] != version and time.monotonic() < deadline:
        time.sleep(0.5)
    r = backend.post("/predict", json={"tasks": [{"id": ids[0], "data": tasks[0]["data"]}]}).json()["results"][0]
    assert r["model_version"] == version and 0 <= r["score"] <= 1
    assert next_task_id(label_studio, pid) in unlabeled
