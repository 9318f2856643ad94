"""`mammoflag import --project` against a real Label Studio: tasks it can serve, never twice."""

from __future__ import annotations

import csv
import os
import threading
import time

import httpx
import pytest

from importers.run import iter_tasks
from importers.to_label_studio import import_tasks_to_label_studio
from label_config import load_label_config
from mammoflag.cli import main
from mammoflag.paths import resolve_task_image

pytestmark = pytest.mark.label_studio


@pytest.fixture
def ls_env(monkeypatch, label_studio, data_root, tmp_path):
    for var in [v for v in os.environ if v.startswith("MAMMOFLAG_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("MAMMOFLAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAMMOFLAG_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MAMMOFLAG_PATIENT_KEY_SECRET", "ls-import-test-secret")
    monkeypatch.setenv("MAMMOFLAG_LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("MAMMOFLAG_LABEL_STUDIO_TOKEN", label_studio.token)
    return data_root


def _tasks(ls_client, project_id: int) -> list:
    return list(ls_client.tasks.list(project=project_id, page_size=1000))


def test_import_into_label_studio_serves_images_and_never_duplicates(synthetic_cohort, ls_env, label_studio,
                                                                     ls_client, capsys):
    dicom_dir, _ = synthetic_cohort
    out = ls_env / "ls-import"
    title = "Import test project"
    args = ["import", str(dicom_dir), "--out", str(out), "--long-side", "256", "--workers", "1", "--no-progress",
            "--project", title]
    assert main(args) == 0
    assert "tasks added" in capsys.readouterr().out

    [project] = [p for p in ls_client.projects.list(title=title) if p.title == title]
    with open(out / "manifest.csv", newline="") as fh:
        manifest = {row["key"]: row for row in csv.DictReader(fh)}
    tasks = _tasks(ls_client, project.id)
    assert sorted(t.data["key"] for t in tasks) == sorted(manifest)
    assert 'name="findings"' in project.label_config

    # Label Studio itself serves the PNG behind a task's local-files URL
    headers = {"Authorization": f"Token {label_studio.token}"}
    for task in tasks[:3]:
        url = task.data["image"]
        assert url.startswith("/data/local-files/?d=")
        r = httpx.get(label_studio.url + url, headers=headers, timeout=30)
        assert r.status_code == 200, r.text[:200]
        assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert r.content == resolve_task_image(url, ls_env).read_bytes()
    # ... and nothing outside the data root
    r = httpx.get(f"{label_studio.url}/data/local-files/?d=../../etc/passwd", headers=headers, timeout=30)
    assert r.status_code != 200 or b"root:" not in r.content

    # the same command again, and by project id: nothing new, nothing twice
    assert main(args) == 0
    assert main(args[:-1] + [str(project.id)]) == 0
    again = _tasks(ls_client, project.id)
    assert len(again) == len(tasks)
    assert "0 tasks added" in capsys.readouterr().out


def test_project_refuses_data_dir_outside_the_data_root(synthetic_cohort, ls_env, tmp_path, capsys):
    dicom_dir, _ = synthetic_cohort
    assert main(["import", str(dicom_dir), "--out", str(tmp_path / "elsewhere"), "--project", "Elsewhere",
                 "--no-progress"]) == 2
    assert "not inside the data root" in capsys.readouterr().err


def test_an_import_racing_another_leaves_each_image_once(imported_cohort, data_root, ls_client):
    """While our import sends its chunks, another sends some of the same images: at the end each key is there
    once, whichever copy came first."""
    title = "Concurrent import project"
    xml = load_label_config().xml
    with open(imported_cohort / "manifest.csv", newline="") as fh:
        keys = sorted(row["key"] for row in csv.DictReader(fh))
    ours: dict = {}
    worker = threading.Thread(target=lambda: ours.update(result=import_tasks_to_label_studio(
        ls_client, title, imported_cohort, data_root, xml, chunk_size=2)))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # our import has begun sending
            found = [p for p in ls_client.projects.list(title=title) if p.title == title]
            if found and (ls_client.projects.get(found[0].id).task_number or 0) >= 2:
                break
            assert worker.is_alive() and time.monotonic() < deadline, "our import never started sending"
            time.sleep(0.05)
        project_id = found[0].id
        # the other import: the last 5 images, which ours has not sent yet
        last = set(keys[-5:])
        theirs = [t for t in iter_tasks(imported_cohort, data_root) if t["data"]["key"] in last]
        ls_client.projects.import_tasks(project_id, request=theirs)
    finally:
        worker.join(120)
    result = ours["result"]
    assert result.duplicates_removed == 5 and result.duplicates_annotated == 0
    assert "duplicate tasks removed" in result.as_text()
    assert sorted(t.data["key"] for t in _tasks(ls_client, project_id)) == keys
