"""Novelty at the flagger: each image's novelty in images.csv and flags.csv, and the run's shift warning.

The tiny hand-set model (tests/factories.py) with an embedding output and a novelty reference fitted on
a "site" whose images' tissue reaches 30-70; cohorts of that site and of a brighter one are flagged
through ``flag_cohort`` and the real ``mammoflag flag`` command.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factories import tiny_model_version
from flagger.checkpoint import Checkpoint
from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger.records import ImageRecord, UnitKind, UnitResult, WorkUnit
from flagger_cohorts import BIOPSY, FAINT, NOTHING, read_csv, write_display_cohort
from mammoflag.registry import resolve_model

REPO = Path(__file__).resolve().parents[2]
SITE = (30, 70)  # the labelled site's tissue range
OTHER_SITE = (110, 160)


def _studies(n: int) -> list[list[int]]:
    return [[NOTHING, FAINT, BIOPSY, NOTHING][: 2 + s % 3] for s in range(n)]


def _inputs(data_dir: Path, spec) -> np.ndarray:
    from mammoflag.preprocess import load_display_image, model_input_batch

    with open(data_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return model_input_batch([load_display_image(data_dir / r["image"]) for r in rows], spec.input_size)


@pytest.fixture(scope="module")
def novelty_registry(tmp_path_factory, flag_spec) -> Path:
    tmp = tmp_path_factory.mktemp("novelty")
    train = _inputs(write_display_cohort(tmp / "train", _studies(50), seed=11, tissue_max=SITE), flag_spec)
    valid = _inputs(write_display_cohort(tmp / "valid", _studies(16), seed=12, tissue_max=SITE), flag_spec)
    tiny_model_version(tmp / "models", flag_spec, novelty_inputs=(train, valid))
    return tmp / "models"


def _flag(cohort: Path, registry: Path, out: Path):
    outputs = FlagOutputs(out / "flags.csv", images=out / "images.csv")
    summary = flag_cohort(cohort, resolve_model(registry), outputs, options=FlagOptions(workers=0, progress=False))
    return summary, read_csv(outputs.flags), read_csv(outputs.images)


def test_a_cohort_from_the_labelled_site_gets_novelty_and_no_warning(novelty_registry, tmp_path):
    cohort = write_display_cohort(tmp_path / "same", _studies(40), seed=13, tissue_max=SITE)
    summary, flags, images = _flag(cohort, novelty_registry, tmp_path / "out")
    assert images and all(r["novelty"] for r in images)
    by_study: dict[str, float] = {}
    for r in images:
        by_study[r["study_id"]] = max(by_study.get(r["study_id"], 0.0), float(r["novelty"]))
    assert {r["study_id"]: float(r["novelty"]) for r in flags} == pytest.approx(by_study, abs=1e-3)
    assert summary.shift is not None and summary.shift.images == len(images)
    assert not summary.shift.shifted, summary.shift.explain()
    assert "novelty: " in summary.format() and "no sign that it differs" in summary.format()
    assert "by manufacturer" not in summary.format()  # nothing to point at


def test_a_cohort_from_another_site_is_said_to_be_unlike_the_validation(novelty_registry, tmp_path):
    cohort = write_display_cohort(tmp_path / "other", _studies(40), seed=14, tissue_max=OTHER_SITE)
    env = {**os.environ, "MAMMOFLAG_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "mammoflag.cli", "flag", str(cohort), "--model", str(novelty_registry),
                           "--out", str(tmp_path / "flags.csv"), "--images-out", str(tmp_path / "images.csv"),
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "warning: " in said and "does not look like the images the trust gate judged" in said
    # which manufacturers' images to label first: every one of this cohort's, each with its count beyond
    from flagger_cohorts import MANUFACTURERS

    by_maker = next(line for line in said.splitlines() if "images beyond, by manufacturer:" in line)
    assert all(m in by_maker for m in MANUFACTURERS)
    images = read_csv(tmp_path / "images.csv")
    assert sum(float(r["novelty"]) > 1 for r in images) > 0.8 * len(images)


def test_a_version_without_a_reference_writes_empty_novelty(tiny_registry, known_cohort, tmp_path):
    summary, flags, images = _flag(known_cohort, tiny_registry, tmp_path / "out")
    assert summary.shift is None and "novelty" not in summary.format()
    assert all(r["novelty"] == "" for r in flags) and all(r["novelty"] == "" for r in images)


def test_novelty_travels_in_shard_json_and_old_checkpoints_take_it(tmp_path):
    record = ImageRecord("1.2:0", {"study_instance_uid": "1.2"}, (0.1, 0.9), 1.25)
    assert ImageRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert ImageRecord.from_json({"key": "k", "hints": {}, "probs": [0.5]}).novelty is None  # an older shard

    # a checkpoint written before novelty existed: its images table has no novelty column
    path = tmp_path / "old.sqlite"
    with Checkpoint(path) as ckpt:
        ckpt.add_results("v/m", [UnitResult(WorkUnit("u0", UnitKind.DISPLAY, "/x/0.png"),
                                            [ImageRecord("a:0", {"study_instance_uid": "s"}, (0.2,), None)])])
    db = sqlite3.connect(path)
    with db:
        db.execute("ALTER TABLE images DROP COLUMN novelty")
    db.close()
    with Checkpoint(path) as ckpt:
        ckpt.add_results("v/m", [UnitResult(WorkUnit("u1", UnitKind.DISPLAY, "/x/1.png"),
                                            [ImageRecord("b:0", {"study_instance_uid": "s"}, (0.3,), 0.5)])])
        got = {r.key: r.novelty for r, _ in ckpt.iter_images("v/m")}
    assert got == {"a:0": None, "b:0": 0.5}


def test_the_research_leads_report_says_it_too(novelty_registry, tmp_path):
    """`mammoflag report --flags` recomputes the run's shift test from images.csv and the version's reference."""
    from mammoflag.registry import Registry
    from reports.run import make_report

    for name, site in (("same", SITE), ("other", OTHER_SITE)):
        cohort = write_display_cohort(tmp_path / name, _studies(40), seed=21, tissue_max=site)
        summary, _, _ = _flag(cohort, novelty_registry, tmp_path / f"out-{name}")
        make_report([], Registry(novelty_registry), "novelty", tmp_path / f"report-{name}",
                    flags=tmp_path / f"out-{name}" / "flags.csv", resamples=50)
        shown = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())["cohort"]["shift"]
        assert summary.shift is not None
        assert (shown["images"], shown["beyond"]) == (summary.shift.images, summary.shift.beyond)
        html = (tmp_path / f"report-{name}" / "index.html").read_text()
        assert f'data-shifted="{int(name == "other")}"' in html
        assert ("Unlike the validation" in html) == (name == "other")
