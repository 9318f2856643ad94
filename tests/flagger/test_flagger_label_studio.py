"""`mammoflag flag --labels PROJECT`: human labels read from a real Label Studio project override the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flagger_cohorts import KNOWN_STUDIES, read_csv, uid
from label_config import load_label_config
from ls_helpers import annotate

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.label_studio
def test_labels_from_a_label_studio_project_override_the_model(label_studio, ls_client, known_cohort,
                                                                tiny_registry, tmp_path, flag_spec):
    cfg = load_label_config()
    project = ls_client.projects.create(title="flagger human labels", label_config=cfg.xml)
    keys = [f"{uid(0, 'image', s, i)}:0" for s, spots in enumerate(KNOWN_STUDIES) for i in range(len(spots))]
    tasks = [{"data": {"image": f"/data/local-files/?d=cohort/{n}.png", "key": key, "study_label": "s",
                       "view_position": "CC", "laterality": "L"}} for n, key in enumerate(keys)]
    ls_client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    task_ids = {t.data["key"]: t.id for t in ls_client.tasks.list(project=project.id)}

    biopsy_image = f"{uid(0, 'image', 1, 1)}:0"  # the model flags study 1 for biopsy_tool through it
    quiet_image = f"{uid(0, 'image', 0, 2)}:0"  # nothing the model can see
    both_image = f"{uid(0, 'image', 3, 0)}:0"  # the model flags it for both classes
    annotate(ls_client, task_ids[biopsy_image], ["biopsy_tool"], flag_spec)
    annotate(ls_client, task_ids[biopsy_image], ["neither"], flag_spec)  # a later answer wins
    annotate(ls_client, task_ids[quiet_image], ["mag_view"], flag_spec)
    annotate(ls_client, task_ids[both_image], [], flag_spec, was_cancelled=True)  # skipped: no label

    env = {**os.environ, "MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_LABEL_STUDIO_URL": label_studio.url,
           "MAMMOFLAG_LABEL_STUDIO_TOKEN": label_studio.token}
    out = tmp_path / "flags.csv"
    run = subprocess.run([sys.executable, "-m", "mammoflag.cli", "flag", str(known_cohort), "--model",
                          str(tiny_registry), "--out", str(out), "--images-out", str(tmp_path / "images.csv"),
                          "--labels", str(project.id), "--workers", "0", "--no-progress"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert label_studio.token not in run.stdout + run.stderr
    assert "2 human labels loaded" in run.stdout

    rows = {r["study_id"]: r for r in read_csv(out)}
    assert (rows[uid(0, "study", 1)]["flag_biopsy_tool"], rows[uid(0, "study", 1)]["source_biopsy_tool"]) == ("0", "model")
    assert (rows[uid(0, "study", 0)]["flag_mag_view"], rows[uid(0, "study", 0)]["source_mag_view"]) == ("1", "human")
    assert rows[uid(0, "study", 3)]["flag_mag_view"] == "1"  # the cancelled annotation changed nothing
    images = {r["key"]: r for r in read_csv(tmp_path / "images.csv")}
    assert images[biopsy_image]["human_biopsy_tool"] == "0" and images[both_image]["human_mag_view"] == ""
