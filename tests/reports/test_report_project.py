"""`mammoflag report --project` end to end against a real Label Studio: two readers' annotations read
through the API, a registered model scored, the HTML written, no patient key in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factories import tiny_model_version
from label_config import load_label_config
from ls_helpers import annotate, ensure_annotators
from mammoflag.labelstudio import ensure_local_storage, find_or_create_project
from mammoflag.paths import task_url_for
from mammoflag.spec import ModelSpec

pytestmark = pytest.mark.label_studio
REPO = Path(__file__).resolve().parents[2]
SPEC = ModelSpec.from_label_config(load_label_config(), input_size=64)


def test_report_cli_on_a_live_project(label_studio, ls_client, data_root, tmp_path):
    folder = data_root / "report-live"
    tasks = []
    for i, bright in enumerate([250, 30, 250, 30]):
        img = np.random.default_rng(i).integers(0, 40, size=(96, 64), dtype=np.uint8)
        img[40:48, 20:28] = bright
        png = folder / "images" / f"{i}" / "0.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(png)
        tasks.append({"data": {"image": task_url_for(png, data_root), "key": f"1.2.55.{i}:0", "manufacturer": "GE",
                               "model": "Senographe", "patient_key": f"secretpatientkey{i}", "view_position": "CC",
                               "laterality": "L", "view_modifiers": ["magnification"] if i == 1 else []}})
    project = find_or_create_project(ls_client, "report live", load_label_config().xml)
    ensure_local_storage(ls_client, project.id, folder)
    ids = ls_client.projects.import_tasks(project.id, request=tasks, return_task_ids=True).task_ids
    models = tmp_path / "models"
    version = tiny_model_version(models, SPEC)  # made before the readers answer: every read image is held out
    r1, r2 = ensure_annotators(ls_client, ["report-r1", "report-r2"])
    for tid, (a, b) in zip(ids, [(["biopsy_tool"], ["biopsy_tool"]), (["neither"], ["neither"]),
                                 (["biopsy_tool"], ["neither"]), (["neither"], None)]):
        annotate(ls_client, tid, a, SPEC, r1)
        if b:
            annotate(ls_client, tid, b, SPEC, r2)

    env = {"MAMMOFLAG_HOME": str(tmp_path), "MAMMOFLAG_LABEL_STUDIO_URL": label_studio.url,
           "MAMMOFLAG_LABEL_STUDIO_TOKEN": label_studio.token, "MAMMOFLAG_DATA_ROOT": str(data_root),
           "MAMMOFLAG_MODELS_DIR": str(models), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "mammoflag.cli", "report", "--project", "report live", "--out",
                           str(out), "--resamples", "200"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 read tasks, 1 model versions" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["judged_version"] == version.name
    assert report["label_status"]["disputed"] == 1 and report["label_status"]["consensus"] == 2
    biopsy = report["agreement"]["biopsy_tool"]
    assert biopsy["double_read_tasks"] == 3
    [pair] = biopsy["pairs"]
    assert {pair["reader_a"], pair["reader_b"]} == {str(r1), str(r2)} and pair["estimate"]["tasks"] == 3
    assert report["subgroup_images"] == 3  # the disputed task is no human label
    assert {(s["grouping"], s["value"]) for s in report["subgroups"]} == {("site", "report-live"),
                                                                         ("manufacturer / model", "GE / Senographe")}
    html = (out / "index.html").read_text()
    assert "secretpatientkey" not in html and "secretpatientkey" not in (out / "report.json").read_text()
    assert len(list((out / "thumbs").glob("task-*.png"))) >= 1
