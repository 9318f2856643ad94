"""The retrain task against real things: Label Studio, Redis, Celery worker processes, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ls_helpers import annotate, annotate_from_truth, ensure_annotators, import_tasks, truth_by_key
from mammoflag.labelstudio import ensure_local_storage, find_or_create_project, iter_annotated_tasks
from mammoflag.registry import Registry
from mammoflag.settings import Settings
from training.dataset import labelled_set_from_project
from mammoflag.jobs import RedisRunLock

pytestmark = [pytest.mark.label_studio]
UNLABELLED_AT_FIRST = 5  # tasks left for the "new annotations" step


@pytest.fixture(scope="module")
def project(label_studio, ls_client, imported_cohort, synthetic_cohort, data_root, spec):
    """A project with the imported cohort: two readers label all but a few tasks from ground truth,
    disagreeing on one task and contradicting themselves on another; a third reader skips one."""
    _, truth_rows = synthetic_cohort
    truth = truth_by_key(truth_rows)
    project = find_or_create_project(ls_client, "training tests", spec_xml())
    ensure_local_storage(ls_client, project.id, imported_cohort)  # Label Studio serves the images from here
    tasks = json.loads((imported_cohort / "tasks.json").read_text())
    import_tasks(ls_client, project.id, tasks)
    keys = sorted(t["data"]["key"] for t in tasks)
    labelled, later = keys[:-UNLABELLED_AT_FIRST], keys[-UNLABELLED_AT_FIRST:]
    readers = ensure_annotators(ls_client, ["reader-a", "reader-b", "reader-c"])
    overrides = {labelled[0]: [["biopsy_tool"], ["neither"]],  # disagreement
                 labelled[1]: [["neither", "mag_view"], ["neither", "mag_view"]]}  # contradictory
    annotate_from_truth(ls_client, project.id, truth, spec, readers[:2], order=labelled, overrides=overrides)
    by_key = {t.data["key"]: t.id for t in ls_client.tasks.list(project=project.id)}
    annotate(ls_client, by_key[later[0]], [], spec, readers[2], was_cancelled=True)  # a skip
    return {"id": project.id, "truth": truth, "labelled": labelled, "later": later, "by_key": by_key,
            "readers": readers, "overrides": overrides}


def spec_xml() -> str:
    return Settings.from_env({}).label_config().xml


def test_live_annotations_become_consensus_targets(project, ls_client, data_root, spec):
    labelled = labelled_set_from_project(ls_client, project["id"], spec, data_root)
    reasons = {x.key: x.reason for x in labelled.left_out}
    first, second = project["labelled"][:2]
    assert "disagree" in reasons[first] and "contradictory" in reasons[second]
    assert len(labelled.items) == len(project["labelled"]) - 2
    assert labelled.unlabelled == UNLABELLED_AT_FIRST  # the skip counts for nothing
    assert all(i.readers == 2 for i in labelled.items)
    # agreement between the two readers: every labelled task but the contradictory one counts,
    # and they split only on the first one's biopsy_tool
    agreement = labelled.reader_agreement
    assert agreement["double_read_tasks"] == len(project["labelled"]) - 1
    biopsy = agreement["per_class"]["biopsy_tool"]
    assert biopsy["tasks_all_agree"] == biopsy["tasks"] - 1 and 0 < biopsy["fleiss_kappa"] < 1
    truth = project["truth"]
    for item in labelled.items:
        expected = tuple(float(truth[item.key][c]) for c in spec.classes)
        assert item.target == expected
    # how the labels were acquired: the project's sampling setting and each image's first answer time
    assert labelled.sampling == str(getattr(ls_client.projects.get(project["id"]).sampling, "value",
                                            ls_client.projects.get(project["id"]).sampling))
    assert labelled.sampling in ("Sequential sampling", "Uniform sampling", "Uncertainty sampling")
    assert all(i.first_read_at for i in labelled.items)
    # nothing identifying in what training lists
    assert all("PATIENT" not in r.upper() and "/" not in r for r in reasons.values())
    # only annotated tasks (the skipped one included) are read from Label Studio, not the whole project
    read = {t["data"]["key"] for t in iter_annotated_tasks(ls_client, project["id"])}
    assert read == set(project["labelled"]) | {project["later"][0]}


def worker_env(label_studio, data_root, redis_url, home: Path, **extra: str) -> dict[str, str]:
    return {"MAMMOFLAG_HOME": str(home), "MAMMOFLAG_DATA_ROOT": str(data_root),
            "MAMMOFLAG_MODELS_DIR": str(home / "models"), "MAMMOFLAG_BROKER_URL": redis_url,
            "MAMMOFLAG_LABEL_STUDIO_URL": label_studio.url, "MAMMOFLAG_LABEL_STUDIO_TOKEN": label_studio.token,
            "MAMMOFLAG_INPUT_SIZE": "64", "MAMMOFLAG_RETRAIN_MIN_NEW": "20", "MAMMOFLAG_TRAIN_EPOCHS": "2",
            "MAMMOFLAG_TRAIN_LR": "3e-3", "MAMMOFLAG_TRAIN_BATCH_SIZE": "16", "MAMMOFLAG_TRAIN_THREADS": "1",
            "MAMMOFLAG_TRAIN_PRETEXT_STEPS": "40",  # the pretext start, shortened like the epochs
            "MAMMOFLAG_RETRAIN_TIME_LIMIT_S": "600", **extra}


def client_app(env: dict[str, str]):
    from mammoflag.jobs import create_app

    return create_app(Settings.from_env({**os.environ, **env}))


def queued_task_names(redis_url: str, queue: str) -> list[tuple[str, list]]:
    import redis

    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in r.lrange(queue, 0, -1):
        msg = json.loads(raw)
        body = json.loads(__import__("base64").b64decode(msg["body"]))
        out.append((msg["headers"]["task"], body[0]))
    return out


@pytest.mark.services
@pytest.mark.slow
def test_a_real_worker_retrains_through_redis(project, label_studio, ls_client, data_root, redis_url, tmp_path,
                                              celery_worker_factory, spec):
    env = worker_env(label_studio, data_root, redis_url, tmp_path)
    app = client_app(env)
    worker = celery_worker_factory(env, queues="training")  # 'predict' stays queued for us to inspect
    pid = project["id"]

    result = app.send_task("mammoflag.retrain", args=(pid,)).get(timeout=600)
    assert result["status"] == "trained" and result["became_current"], result
    registry = Registry(tmp_path / "models")
    assert registry.current_name() == result["version"]
    card = registry.current().card
    assert card.data.project_id == pid and card.data.left_out_count == 2
    assert ("mammoflag.repredict", [pid, result["version"]]) in queued_task_names(redis_url, "predict")

    # the same message again: nothing new, nothing trained (idempotent)
    again = app.send_task("mammoflag.retrain", args=(pid,)).get(timeout=120)
    assert again["status"] == "up_to_date" and again["version"] == result["version"]

    # a few new labels are not enough; force is
    for key in project["later"][1:4]:
        annotate(ls_client, project["by_key"][key], ["neither"], spec, project["readers"][0])
    waiting = app.send_task("mammoflag.retrain", args=(pid,)).get(timeout=120)
    assert waiting["status"] == "waiting" and waiting["new_annotations"] == 3
    assert len(registry.versions()) == 1

    # while another run holds the project's lock, a message only records that a rerun is wanted
    lock = RedisRunLock(redis_url, pid, ttl_s=60)
    assert lock.acquire("another-run")
    try:
        coalesced = app.send_task("mammoflag.retrain", args=(pid, True)).get(timeout=120)
        assert coalesced["status"] == "coalesced"
        assert lock.take_rerun() == "force"
    finally:
        lock.release("another-run")
    assert worker.poll() is None


@pytest.mark.services
@pytest.mark.slow
def test_a_killed_worker_leaves_the_registry_whole_and_the_run_is_retried(
        project, label_studio, data_root, redis_url, tmp_path, celery_worker_factory):
    app_module = "tests.training.quick_redelivery_app"
    slow = worker_env(label_studio, data_root, redis_url, tmp_path, MAMMOFLAG_TRAIN_EPOCHS="40")
    app = client_app(slow)
    registry = Registry(tmp_path / "models")
    doomed = celery_worker_factory(slow, app=app_module, queues="training", name="doomed")
    async_result = app.send_task("mammoflag.retrain", args=(project["id"], True))

    deadline = time.monotonic() + 300
    while not (async_result.state == "PROGRESS" and async_result.info.get("stage") == "training"):
        assert time.monotonic() < deadline, "the run never started training"
        assert doomed.poll() is None, Path(doomed.log_path).read_text()[-2000:]
        time.sleep(0.5)
    time.sleep(4)  # well inside fitting: 40 epochs take minutes
    os.killpg(doomed.pid, signal.SIGKILL)  # the main process and its pool child, as a lost node
    doomed.wait(10)

    assert registry.versions() == [] and registry.current_name() is None
    assert async_result.state == "PROGRESS"  # nobody finished it

    fast = worker_env(label_studio, data_root, redis_url, tmp_path)
    celery_worker_factory(fast, app=app_module, queues="training", name="rescuer")
    outcome = async_result.get(timeout=300)  # the same message, delivered again to the second worker
    assert outcome["status"] in ("trained", "up_to_date"), outcome
    versions = registry.versions()
    assert len(versions) == 1 and registry.current_name() == versions[0].name == outcome["version"]
    assert versions[0].card.data.run == async_result.id
    # the killed run left at most its staging folder: no half-published version, no stray pointer file;
    # the pretext caches (training/pretext.py: the tile body's, the whole-image body's) are whole files only,
    # written atomically
    others = {p.name for p in (tmp_path / "models").iterdir()} - {v.name for v in versions} - {"current", "pretext"}
    assert all(name.startswith(".staging-") for name in others), others
    cached = sorted(p.name for p in (tmp_path / "models" / "pretext").iterdir())
    assert len(cached) == 2 and all(n.endswith(".pt") for n in cached), cached
    assert "zoom" in cached[1] and "zoom" not in cached[0], cached


@pytest.mark.slow
def test_cli_trains_from_a_live_project(project, label_studio, data_root, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, **worker_env(label_studio, data_root, "redis://unused", tmp_path),
           "MAMMOFLAG_TRAIN_MODE": "frozen", "MAMMOFLAG_TRAIN_FROZEN_EPOCHS": "1", "MAMMOFLAG_TRAIN_QUANTIZE_INT8": "0"}
    proc = subprocess.run([sys.executable, "-m", "mammoflag.cli", "train", "--project", str(project["id"])],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = Registry(tmp_path / "models").current()
    assert version.name in proc.stdout and "biopsy_tool" in proc.stdout and "current: yes" in proc.stdout
    assert version.card.data.project_id == project["id"] and version.card.data.left_out_count == 2
    assert label_studio.token not in proc.stdout + proc.stderr
