"""Hostile input for the flagger: invalid UIDs never key a row, cohort.csv cells never start a formula,
an unreadable folder is a unit of its own. (No model needed: these stop before inference.)"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from flagger.cohort import export_cohort
from flagger.records import UnitKind, WorkUnit
from flagger.sources import PrepareContext, iter_units, prepare_unit
from mammoflag.fileio import FORMULA_PREFIXES

CTX = PrepareContext(input_size=32, display_long_side=64)


def manifest_unit(tmp_path: Path, **row) -> WorkUnit:
    png = tmp_path / "images" / "1.2.3" / "0.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(png)
    base = {"key": "1.2.3:0", "image": "images/1.2.3/0.png", "sop_instance_uid": "1.2.3", "frame": "0",
            "study_instance_uid": "1.2.4"}
    base.update(row)
    return WorkUnit(base["key"], UnitKind.DISPLAY, str(tmp_path / base["image"]), base)


def test_a_manifest_row_with_a_formula_for_a_uid_fails(tmp_path):
    bad_study = prepare_unit(manifest_unit(tmp_path, study_instance_uid="=cmd|' /C calc'!A0"), CTX)
    assert bad_study.problem and "Study Instance UID (0020,000D) is not a valid UID" in bad_study.problem.reason
    assert "=cmd" not in bad_study.problem.reason
    bad_key = prepare_unit(manifest_unit(tmp_path, key="=1+1"), CTX)
    assert bad_key.problem and "key" in bad_key.problem.reason
    good = prepare_unit(manifest_unit(tmp_path), CTX)
    assert good.problem is None and good.images[0].key == "1.2.3:0"


def test_cohort_cells_never_start_a_formula(tmp_path):
    flags = tmp_path / "flags.csv"
    with open(flags, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "image_count", "flag_biopsy_tool", "manufacturer"])
        w.writerow(["=cmd|' /C calc'!A0", "1", "1", "@SUM(A1)"])
        w.writerow(["1.2.3", "1", "1", "+HYPERLINK(x)"])
    export_cohort(flags, [], tmp_path / "cohort.csv")
    with open(tmp_path / "cohort.csv", newline="") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert cells and not [c for c in cells if c.startswith(FORMULA_PREFIXES)]


def test_an_unlistable_folder_is_a_failing_unit(tmp_path, monkeypatch):
    (tmp_path / "in" / "ok").mkdir(parents=True)
    (tmp_path / "in" / "ok" / "a.dcm").write_bytes(b"x")
    (tmp_path / "in" / "locked").mkdir()
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    units = list(iter_units(tmp_path / "in"))
    assert [u.unit_id for u in units] == ["locked/", "ok/a.dcm"] or [u.unit_id for u in units] == ["ok/a.dcm",
                                                                                                "locked/"]
    locked = next(u for u in units if u.unit_id == "locked/")
    assert prepare_unit(locked, CTX).problem.status == "failed"
