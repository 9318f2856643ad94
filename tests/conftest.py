"""Shared fixtures: real services, started for the test session and cleaned up afterwards.

- ``label_studio``: a real Label Studio server (its own venv) on a free loopback port with a
  fresh data dir and a known admin + API token; on PostgreSQL when MAMMOFLAG_TEST_DB=postgres
  (CI), on SQLite otherwise.
- ``redis_url``: a Redis database on 127.0.0.1:6379 flushed for this session.
- ``celery_worker_factory``: starts real ``celery worker`` processes.

Every process the tests start has ``MAMMOFLAG_PRETRAINED_DOWNLOAD=0``: tests never download.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mammoflag.label_studio_server import LabelStudioServer, PostgresConfig
from mammoflag.processes import stop_process_groups
from shared_cohort import COHORT_DICOM_SIZE, COHORT_LONG_SIDE, COHORT_STUDIES, TEST_PATIENT_KEY_SECRET

REPO = Path(__file__).resolve().parents[1]
PG_DSN_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def pytest_configure(config):
    # Tests never download: not ImageNet weights in a worker started here, nor anything else. The tests of the
    # download itself pass their own URL on a loopback server (tests/training/test_pretrained_download.py).
    os.environ["MAMMOFLAG_PRETRAINED_DOWNLOAD"] = "0"


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mammoflag")


@pytest.fixture(scope="session")
def data_root(session_tmp) -> Path:
    """The shared data root: Label Studio serves local files below it, the backend reads from it."""
    p = session_tmp / "data"
    p.mkdir()
    return p


def _create_postgres_db() -> str:
    import psycopg

    name = f"mammoflag_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_postgres_db(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_DSN_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def label_studio(session_tmp, data_root):
    """A running Label Studio; yields the LabelStudioServer (url, username, password, token)."""
    pg = None
    if os.environ.get("MAMMOFLAG_TEST_DB", "sqlite") == "postgres":
        pg = PostgresConfig(name=_create_postgres_db())
    server = LabelStudioServer(
        data_dir=session_tmp / "label-studio",
        files_root=data_root,
        username="admin@mammoflag.test",
        password=secrets.token_urlsafe(12),
        token=secrets.token_hex(20),
        postgres=pg,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if pg:
            _drop_postgres_db(pg.name)


@pytest.fixture(scope="session")
def ls_client(label_studio):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio.url, api_key=label_studio.token)


CLAIM_KEY = "mammoflag:test-claim"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database of its own for this test session (1..15), claimed so parallel runs never share one."""
    import redis

    claim = f"mammoflag:test-claim:{uuid.uuid4().hex}"
    for db in range(1, 16):
        r = redis.Redis(host="127.0.0.1", port=6379, db=db)
        if r.dbsize() == 0 and r.set(CLAIM_KEY, claim, nx=True, ex=4 * 3600):
            break
    else:
        pytest.fail("no free Redis database on 127.0.0.1:6379 (1..15 all in use)")
    yield f"redis://127.0.0.1:6379/{db}"
    r.flushdb()


@pytest.fixture(autouse=True)
def _empty_queues_per_test(request):
    """Each test that uses Redis starts on empty queues: a message an earlier test left queued
    (a webhook's retrain, a retrain's repredict) must never reach this test's workers."""
    if "redis_url" not in request.fixturenames:
        yield
        return
    import redis

    r = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    claim = r.get(CLAIM_KEY)
    r.flushdb()
    r.set(CLAIM_KEY, claim, ex=4 * 3600)
    yield


@pytest.fixture
def celery_worker_factory(tmp_path):
    """start(env: dict, app="mammoflag.worker", concurrency=1, queues=None) -> Popen; all stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str], app: str = "mammoflag.worker", concurrency: int = 1,
              queues: str | None = None, name: str | None = None) -> subprocess.Popen:
        name = name or f"w{len(procs)}-{uuid.uuid4().hex[:6]}"
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=INFO",
               f"--concurrency={concurrency}", "--pool=prefork", f"--hostname={name}@%h", "--without-gossip",
               "--without-mingle", "--without-heartbeat"]
        if queues:
            cmd += ["-Q", queues]
        log = open(tmp_path / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        procs.append(p)
        return p

    yield start
    stop_process_groups(procs)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is not installed: run scripts/bootstrap --browser")
    return path


# Shared synthetic cohort: generated and imported ONCE per test session for every stage's tests.


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """(dicom_dir, ground_truth rows): 24 synthetic studies x 2-4 images, all vendors, labels known.

    Rows are ground_truth.csv's (strings): file, sop_instance_uid, frame, study_instance_uid,
    patient_id_hash, biopsy_tool, mag_view, manufacturer. dicom_dir also holds ground_truth.csv.
    """
    from importers.synthetic import read_ground_truth, write_synthetic_cohort

    dicom_dir = tmp_path_factory.mktemp("synthetic-dicom")
    gt_path = write_synthetic_cohort(dicom_dir, COHORT_STUDIES, seed=0, size=COHORT_DICOM_SIZE)
    return dicom_dir, read_ground_truth(gt_path)


@pytest.fixture(scope="session")
def imported_cohort(synthetic_cohort, data_root) -> Path:
    """The synthetic cohort imported into DATA_DIR = <data_root>/cohort (images/, manifest.csv, tasks.json ...).

    Task image URLs are relative to ``data_root`` (Label Studio's local-files root in tests).
    """
    from importers.run import import_dicoms
    from mammoflag.dicom.types import NormalizeOptions

    dicom_dir, _ = synthetic_cohort
    out = data_root / "cohort"
    import_dicoms(dicom_dir, out, NormalizeOptions(long_side=COHORT_LONG_SIDE), TEST_PATIENT_KEY_SECRET,
                  data_root=data_root, workers=1, progress=False)
    return out
