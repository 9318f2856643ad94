"""The labeling pool against a real Label Studio, real Redis and a real Celery worker.

A 200-image archive, a pool bound of 30 and a window of 40: the cold start samples every vendor;
each new version re-predicts only the pool, swaps stale tasks for less certain archive images,
never removes a labelled task, and leaves predictions of at most two versions; running a step
again changes nothing.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from factories import tiny_model_version
from mammoflag.datadir import MANIFEST_COLUMNS
from mammoflag.labelstudio import iter_task_states, model_versions
from mammoflag.settings import Settings
from ml_backend.setup_project import COLD_START_VERSION
from mlb_helpers import REPO, model_spec, setup_project, write_display

pytestmark = [pytest.mark.label_studio, pytest.mark.services]

ARCHIVE = 200
BOUND = 30
VENDORS = ["HOLOGIC", "GE MEDICAL SYSTEMS", "SIEMENS", "FUJIFILM", "AGFA"]


def write_archive(folder: Path) -> Path:
    """An import DATA_DIR of ARCHIVE small display PNGs (brightness spread: some certain, some not)."""
    rows = []
    for i in range(ARCHIVE):
        image = f"images/1.2.826.9.{i}/0.png"
        write_display(folder / image, bright=20 + (i * 37) % 236, seed=i)
        rows.append({"key": f"1.2.826.9.{i}:0", "image": image, "sop_instance_uid": f"1.2.826.9.{i}",
                     "study_instance_uid": f"1.2.826.8.{i // 4}", "series_instance_uid": f"1.2.826.7.{i // 4}",
                     "frame": "0", "patient_key": f"p{i // 8}", "view_position": ["CC", "MLO"][i % 2],
                     "laterality": ["L", "R"][(i // 2) % 2], "manufacturer": VENDORS[(i // 4) % len(VENDORS)],
                     "model": "m1", "rows": "96", "cols": "64"})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def next_task(ls_client, pid) -> int:
    """The task Label Studio's queue serves the token's user next."""
    r = ls_client._client_wrapper.httpx_client.request(f"api/projects/{pid}/next", method="GET")
    r.raise_for_status()
    return int(r.json()["id"])


def snapshot(ls_client, pid):
    states = list(iter_task_states(ls_client, pid))
    return ({s.id: s for s in states}, model_versions(ls_client, pid))


def test_pool_stays_bounded_and_fresh_across_versions(stack, ls_client, data_root, tmp_path, redis_url,
                                                      celery_worker_factory):
    from mammoflag.jobs import create_app as create_celery_app

    archive = write_archive(data_root / "pool-archive")
    env = {**stack.env, "MAMMOFLAG_MODELS_DIR": str(tmp_path / "models"), "MAMMOFLAG_POOL_SIZE": str(BOUND),
           "MAMMOFLAG_POOL_WINDOW": "40"}
    pid = setup_project(env, "mlb pool")
    out = subprocess.run([sys.executable, "-m", "mammoflag.cli", "setup-project", "--project", str(pid),
                          "--archive", str(archive)], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{BOUND} added by the stratified cold-start sample" in out.stdout
    assert f"{BOUND} model inputs cached" in out.stdout  # made now, while annotators label the first round
    tasks, _ = snapshot(ls_client, pid)
    assert len(tasks) == BOUND
    manufacturer = {t.data["key"]: t.data["manufacturer"] for t in ls_client.tasks.list(project=pid)}
    assert set(manufacturer.values()) == set(VENDORS)  # every vendor before any model exists
    # before any model the queue follows the cold-start order (setup_project.order_cold_start), not a random draw
    assert f"{BOUND} tasks in the cold-start order" in out.stdout
    order = {p.task: p.score for p in ls_client.predictions.list(project=pid)}
    assert sorted(order) == sorted(tasks) and len(set(order.values())) == BOUND  # one place per task
    assert model_versions(ls_client, pid) == {COLD_START_VERSION: BOUND}
    assert ls_client.projects.get(pid).model_version == COLD_START_VERSION
    assert next_task(ls_client, pid) == min(order, key=order.get)  # Label Studio serves its first place
    again = subprocess.run(out.args, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "0 added" in again.stdout and len(snapshot(ls_client, pid)[0]) == BOUND  # idempotent
    assert {p.task: p.score for p in ls_client.predictions.list(project=pid)} == order  # the order too

    # an annotator labels five pool tasks
    labelled = sorted(tasks)[:5]
    for task_id in labelled:
        ls_client.annotations.create(task_id, result=[{"from_name": "findings", "to_name": "image",
                                                       "type": "choices", "value": {"choices": ["neither"]}}])
    redis.Redis.from_url(redis_url).delete("predict")  # the stack backend's TASKS_CREATED jobs: not its registry

    celery_worker_factory(env, queues="predict")
    celery = create_celery_app(Settings.from_env(env))
    models = Path(env["MAMMOFLAG_MODELS_DIR"])
    seen_keys: set[str] = set(manufacturer)
    for round_no, bias in enumerate([-2.0, -0.5, -3.0, -1.0]):
        version = tiny_model_version(models, model_spec(), bias=bias)
        summary = celery.send_task("mammoflag.repredict", args=[pid, version.name]).get(timeout=300)
        assert summary["switched"], summary
        pool = summary["pool"]
        assert pool["topped_up"] and pool["scored"] == 40 and pool["unlabeled"] == BOUND
        tasks, versions = snapshot(ls_client, pid)
        unlabeled = [t for t in tasks.values() if not t.labelled]
        assert len(unlabeled) == BOUND  # the bound holds
        assert set(labelled) <= set(tasks) and all(tasks[t].labelled for t in labelled)  # never removed
        assert ls_client.projects.get(pid).model_version == version.name
        assert len(versions) <= 2 and version.name in versions  # older versions' predictions deleted
        assert (COLD_START_VERSION in versions) == (round_no == 0)  # the cold-start order, a version later
        assert sum(versions.values()) <= 2 * BOUND
        # every unlabeled pool task has exactly one prediction of the new version; removed ones left with theirs
        preds = [p for p in ls_client.predictions.list(project=pid) if p.model_version == version.name]
        assert sorted(p.task for p in preds) == sorted(t.id for t in unlabeled)
        seen_keys |= {t.key for t in tasks.values()}
        if round_no == 0:
            assert pool["added"] > 0 and pool["removed"] == pool["added"] - 5  # 5 slots freed by labelling

        # the same step again (a redelivered message, or TASKS_CREATED): nothing changes
        before = snapshot(ls_client, pid)
        rerun = celery.send_task("mammoflag.repredict", args=[pid, version.name]).get(timeout=300)
        assert rerun["switched"] and not rerun["pool"]["topped_up"] and rerun["predicted"] == 0
        assert snapshot(ls_client, pid) == before
    assert len(seen_keys) > BOUND + 10  # stale tasks were replaced by archive images over the rounds
    # the model-input cache holds the pool's kept tasks only (added ones are cached on their next round)
    cached = list((data_root / ".pools" / "inputs" / f"project-{pid}").glob("*/*.npz"))
    assert 0 < len(cached) <= BOUND
    state = (data_root / ".pools" / f"project-{pid}.json").read_text()
    assert '"laps": 0' in state and '"topped_up_version"' in state


def test_fast_prediction_import_flag_is_on_and_behaves_as_relied_on(label_studio, ls_client, data_root):
    """Label Studio runs with the memory-efficient prediction import (mammoflag/label_studio_server.py):
    it stores what a request names, recounts only those tasks, and a request naming a task outside the
    project stores nothing (we send <= 500 per request, one internal batch)."""
    from label_studio_sdk.core.api_error import ApiError

    from mammoflag.label_studio_server import FAST_PREDICTION_IMPORT_FLAG
    from mlb_helpers import import_tasks, make_tasks

    assert label_studio.environment()[FAST_PREDICTION_IMPORT_FLAG] == "true"
    xml = Settings.from_env({}).label_config().xml
    pid = ls_client.projects.create(title="fast prediction import", label_config=xml).id
    other = ls_client.projects.create(title="fast prediction import other", label_config=xml).id
    ids = import_tasks(ls_client, pid, make_tasks(data_root, "fast-import", [20, 40, 60, 80]))
    [foreign] = import_tasks(ls_client, other, make_tasks(data_root, "fast-import-other", [20]))
    result = [{"from_name": "findings", "to_name": "image", "type": "choices", "value": {"choices": ["neither"]}}]
    sent = [{"task": t, "result": result, "score": 0.5, "model_version": "v-fast"} for t in ids[:3]]
    assert ls_client.projects.import_predictions(pid, request=sent).created == 3
    counts = {t.id: t.total_predictions for t in ls_client.tasks.list(project=pid, fields="all")}
    assert counts == {ids[0]: 1, ids[1]: 1, ids[2]: 1, ids[3]: 0}
    with pytest.raises(ApiError) as err:
        ls_client.projects.import_predictions(pid, request=[{**sent[0], "task": ids[3]},
                                                            {**sent[0], "task": foreign}])
    assert err.value.status_code == 400
    assert model_versions(ls_client, pid) == {"v-fast": 3}  # nothing of the refused request was stored


def test_import_into_a_pooled_project_indexes_the_archive_and_the_pool_chooses(
        stack, ls_client, data_root, tmp_path, redis_url, celery_worker_factory, synthetic_cohort):
    """`mammoflag import --project` on a project with a pool sends no task: the DATA_DIR becomes one more
    archive of the pool, and the pool's fill (mammoflag.fill_pool, on a real worker) takes only what its
    free slots allow, from every archive; a project without a pool still gets every image (test_import_label_studio)."""
    from mammoflag.jobs import create_app as create_celery_app

    first = write_archive(data_root / "pool-import-first")
    bound = ARCHIVE + 10  # the first archive fills the pool but for 10 slots
    env = {**stack.env, "MAMMOFLAG_MODELS_DIR": str(tmp_path / "models"), "MAMMOFLAG_POOL_SIZE": str(bound),
           "MAMMOFLAG_POOL_WINDOW": "40", "MAMMOFLAG_PATIENT_KEY_SECRET": "pool-import-test-secret"}
    pid = setup_project(env, "mlb pool import")
    out = subprocess.run([sys.executable, "-m", "mammoflag.cli", "setup-project", "--project", str(pid),
                          "--archive", str(first)], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(snapshot(ls_client, pid)[0]) == ARCHIVE
    redis.Redis.from_url(redis_url).delete("predict")
    celery_worker_factory(env, queues="predict")
    celery = create_celery_app(Settings.from_env(env))

    dicom_dir, _ = synthetic_cohort
    data_dir = data_root / "pool-import-second"
    cmd = [sys.executable, "-m", "mammoflag.cli", "import", str(dicom_dir), "--out", str(data_dir), "--long-side",
           "256", "--workers", "1", "--no-progress", "--project", str(pid)]
    for attempt in range(2):  # the second run: already indexed and registered, nothing to fill
        imp = subprocess.run(cmd, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert imp.returncode == 0, imp.stderr[-3000:]
        assert "has a labeling pool" in imp.stdout and "no task sent" in imp.stdout, imp.stdout
        job_id = imp.stdout.split("pool fill job ")[1].split()[0]
        fill = celery.AsyncResult(job_id).get(timeout=300)
        assert fill["status"] == "filled" and fill["added"] == (10 if attempt == 0 else 0), fill
        assert fill["inputs_cached"] == fill["added"], fill  # in the prefork child itself: it may start no process
        assert fill["cold_start_ordered"] == (bound if attempt == 0 else 0), fill  # new tasks: the order again
        assert fill["archives"] == ["pool-import-first", "pool-import-second"]
        with open(data_dir / "manifest.csv", newline="") as fh:
            indexed = {row["key"] for row in csv.DictReader(fh)}
        assert len(indexed) > 10  # the whole cohort is in the archive index ...
        tasks, _ = snapshot(ls_client, pid)
        keys = {t.key for t in tasks.values()}
        assert len(tasks) == bound and len(keys & indexed) == 10  # ... but only what the pool's bound allows went in
        assert sum(not t.labelled for t in tasks.values()) == bound
    # Label Studio serves the images of the tasks the pool took from the new archive (a storage on it)
    from_import = [t for t in ls_client.tasks.list(project=pid) if t.data["key"] in indexed]
    import httpx

    r = httpx.get(stack.env["MAMMOFLAG_LABEL_STUDIO_URL"] + from_import[0].data["image"],
                  headers={"Authorization": f"Token {stack.env['MAMMOFLAG_LABEL_STUDIO_TOKEN']}"}, timeout=30)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


def test_a_project_without_a_pool_gets_the_cold_start_order_too(stack, ls_client, data_root, tmp_path):
    """`setup-project` without --archive (what `up --demo` and `import --project` users run): before any model
    the queue serves the typical/diverse order, not Label Studio's random draw; running it again keeps the
    order; tasks imported later are placed by running it again; a project too large for it says so."""
    from mlb_helpers import import_tasks, make_tasks, run_setup_project

    env = {**stack.env, "MAMMOFLAG_MODELS_DIR": str(tmp_path / "models")}  # no version yet
    pid = setup_project(env, "mlb unpooled cold start")
    ids = import_tasks(ls_client, pid, make_tasks(data_root, "unpooled-cold", [20 + 19 * i for i in range(12)]))
    out = run_setup_project(env, str(pid))
    assert "12 tasks in the cold-start order" in out, out
    order = {p.task: p.score for p in ls_client.predictions.list(project=pid)}
    assert sorted(order) == sorted(ids) and len(set(order.values())) == 12
    assert all(not p.result for p in ls_client.predictions.list(project=pid))  # no prelabel shown
    assert ls_client.projects.get(pid).model_version == COLD_START_VERSION
    assert next_task(ls_client, pid) == min(order, key=order.get)
    assert "12 unlabeled tasks already in the cold-start order" in run_setup_project(env, str(pid))
    assert {p.task: p.score for p in ls_client.predictions.list(project=pid)} == order
    more = import_tasks(ls_client, pid, make_tasks(data_root, "unpooled-cold-2", [40, 90, 200]))
    assert "15 tasks in the cold-start order" in run_setup_project(env, str(pid))
    assert sorted(p.task for p in ls_client.predictions.list(project=pid)) == sorted(ids + more)
    assert model_versions(ls_client, pid) == {COLD_START_VERSION: 15}
    big = run_setup_project({**env, "MAMMOFLAG_POOL_SIZE": "10"}, str(pid))
    assert "15 unlabeled tasks, more than MAMMOFLAG_POOL_SIZE=10" in big and "random draw" in big
    # once a version is current, the queue is that version's re-prediction's to order
    from ml_backend.setup_project import order_unpooled_cold_start

    tiny_model_version(tmp_path / "models", model_spec())
    assert order_unpooled_cold_start(ls_client, Settings.from_env(env), pid) == ""
    assert model_versions(ls_client, pid) == {COLD_START_VERSION: 15}
