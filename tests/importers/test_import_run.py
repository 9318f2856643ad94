"""`mammoflag import` end to end on a small synthetic cohort plus a folder of bad files."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from importers.run import MANIFEST_COLUMNS, REPORT_COLUMNS
from importers.synthetic import read_ground_truth, write_problem_files, write_synthetic_cohort
from importers.to_label_studio import duplicate_tasks_to_delete
from mammoflag.cli import main
from mammoflag.paths import resolve_task_image

IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
                        "ReferringPhysicianName", "InstitutionName")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small cohort (5 studies) with a folder of problem files inside it."""
    root = tmp_path_factory.mktemp("import-run")
    dicom_dir = root / "dicom"
    gt = read_ground_truth(write_synthetic_cohort(dicom_dir, 5, seed=9, size=160))  # 9: mag views of 3 vendors
    expected_problems = write_problem_files(dicom_dir / "problems", seed=3)
    return root, dicom_dir, gt, expected_problems


@pytest.fixture
def env(monkeypatch, tmp_path):
    data_root = tmp_path / "data-root"
    data_root.mkdir()
    for var in [v for v in os.environ if v.startswith("MAMMOFLAG_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("MAMMOFLAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAMMOFLAG_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MAMMOFLAG_PATIENT_KEY_SECRET", "import-test-secret")
    return data_root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fake_identifiers(dicom_dir: Path) -> set[str]:
    """Every identifying value (and each part of a person name) in the cohort's headers."""
    found: set[str] = set()
    for path in dicom_dir.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in IDENTIFYING_KEYWORDS:
            value = str(ds.get(keyword, "") or "")
            found.update(part for part in [value, *value.replace("^", " ").split()] if len(part) >= 5)
    return found


def _import(dicom_dir: Path, out: Path, *extra: str) -> int:
    return main(["--log-level", "DEBUG", "import", str(dicom_dir), "--out", str(out), "--long-side", "128",
                 "--no-progress", *extra])


def test_import_end_to_end(cohort, env, capsys, caplog):
    root, dicom_dir, gt, expected_problems = cohort
    out = env / "imports" / "first"
    caplog.set_level(logging.DEBUG)
    assert _import(dicom_dir, out, "--workers", "2") == 0
    printed = capsys.readouterr()
    assert "import_report.csv" in printed.out

    # exactly one report row per input file, whatever it was
    report = _read_csv(out / "import_report.csv")
    assert list(report[0]) == list(REPORT_COLUMNS)
    assert sorted(r["path"] for r in report) == _all_files(dicom_dir)
    by_path = {r["path"]: r for r in report}
    for rel, status in expected_problems.items():
        row = by_path[f"problems/{rel}"]
        assert row["status"] == status, (rel, row)
        if status != "imported":
            assert row["reason"], f"{rel} has no reason"
    assert by_path["ground_truth.csv"]["status"] == "skipped"
    assert "duplicate" in by_path["problems/zz_copies/copy_of_good"]["reason"]
    assert "Transfer Syntax" in by_path["problems/no_transfer_syntax_rle.dcm"]["reason"]
    assert "transfer-syntax" in by_path["problems/no_transfer_syntax_native.dcm"]["notes"]
    fallback = [r for r in report if "for-processing" in r["notes"]]
    assert fallback, "FOR PROCESSING images are marked in the report"

    # every ground-truth frame became one manifest row, one PNG and one task
    manifest = _read_csv(out / "manifest.csv")
    assert list(manifest[0]) == list(MANIFEST_COLUMNS)
    keys = [m["key"] for m in manifest]
    assert len(keys) == len(set(keys))
    assert {f"{r['sop_instance_uid']}:{r['frame']}" for r in gt} <= set(keys)
    imported_frames = sum(int(r["frames"]) for r in report if r["status"] == "imported")
    assert imported_frames == len(manifest)
    assert sum(r["status"] == "imported" for r in report) == len({r["file"] for r in gt}) + 2
    for m in manifest:
        with Image.open(out / m["image"]) as im:
            assert im.mode == "L" and max(im.size) <= 128
        assert m["image"] == f"images/{m['sop_instance_uid']}/{m['frame']}.png"
    assert not list(out.rglob("*.partial")), "no temporary files are left behind"

    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["key"] for t in tasks] == keys
    multi = [t for t in tasks if t["data"]["frame"] == 1]
    assert multi, "the multi-frame file gives one task per frame"
    for task in tasks:
        data = task["data"]
        assert set(data) == (set(MANIFEST_COLUMNS) | {"study_label"})
        assert resolve_task_image(data["image"], env) == (out / "images" / data["sop_instance_uid"] /
                                                          f"{data['frame']}.png").resolve()
        assert isinstance(data["view_modifiers"], list) and isinstance(data["image_type"], list)
    # header hints: the View Modifier code of the vendors that write one, nothing for the others
    mag_keys = {f"{r['sop_instance_uid']}:{r['frame']}": r["manufacturer"] for r in gt if r["mag_view"] == "1"}
    coded = {t["data"]["manufacturer"]: "magnification" in t["data"]["view_modifiers"]
             for t in tasks if t["data"]["key"] in mag_keys}
    assert coded == {"HOLOGIC, Inc.": True, "GE MEDICAL SYSTEMS": False, "FUJIFILM Corporation": False}

    # nothing identifying anywhere: outputs, logs, printed text
    identifiers = _fake_identifiers(dicom_dir)
    assert len(identifiers) > 20
    texts = {name: (out / name).read_text() for name in ("tasks.json", "manifest.csv", "import_report.csv")}
    texts["logs"] = caplog.text
    texts["stdout+stderr"] = printed.out + printed.err
    for name, text in texts.items():
        leaked = sorted(i for i in identifiers if i in text or i.lower() in text.lower())
        assert not leaked, f"{name} leaks {leaked[:3]}"
    assert str(root) not in caplog.text


def test_workers_do_not_change_the_result(cohort, env):
    _, dicom_dir, _, _ = cohort
    one, two = env / "one", env / "two"
    assert _import(dicom_dir, one, "--workers", "1") == 0
    assert _import(dicom_dir, two, "--workers", "2") == 0
    assert (one / "import_report.csv").read_text() == (two / "import_report.csv").read_text()
    assert (one / "manifest.csv").read_text() == (two / "manifest.csv").read_text()
    for m in _read_csv(one / "manifest.csv"):
        assert (one / m["image"]).read_bytes() == (two / m["image"]).read_bytes()


def test_rerun_resumes_and_never_duplicates(cohort, env):
    _, dicom_dir, _, _ = cohort
    out = env / "resumed"
    assert _import(dicom_dir, out, "--workers", "1") == 0
    first_manifest = (out / "manifest.csv").read_text()
    first_report = _read_csv(out / "import_report.csv")

    # an unchanged re-run reads nothing again and writes nothing twice
    assert _import(dicom_dir, out, "--workers", "1") == 0
    assert (out / "manifest.csv").read_text() == first_manifest
    report = _read_csv(out / "import_report.csv")
    assert len(report) == len(first_report)
    imported = [r for r in report if r["status"] == "imported"]
    assert imported and all("resumed" in r["notes"] for r in imported)

    # an interrupted run: a half-written manifest row, a PNG missing, the final report not yet written
    manifest_lines = first_manifest.splitlines(keepends=True)
    cut = manifest_lines[-1]
    (out / "manifest.csv").write_text("".join(manifest_lines[:-1]) + cut[: len(cut) // 2])
    victim = _read_csv(out / "manifest.csv")[1]
    (out / victim["image"]).unlink()
    (out / "import_report.csv").rename(out / "import_report.csv.partial")
    assert _import(dicom_dir, out, "--workers", "2") == 0
    manifest = _read_csv(out / "manifest.csv")
    assert sorted(m["key"] for m in manifest) == sorted(m["key"] for m in _read_csv_text(first_manifest))
    assert (out / victim["image"]).is_file()
    report = _read_csv(out / "import_report.csv")
    assert sorted(r["path"] for r in report) == _all_files(dicom_dir)
    assert Counter(r["status"] for r in report) == Counter(r["status"] for r in first_report)
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == len(manifest) == len({t["data"]["key"] for t in tasks})


def _read_csv_text(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


def test_exit_status_only_when_the_run_cannot_happen(cohort, env, tmp_path, monkeypatch, capsys):
    _, dicom_dir, _, _ = cohort
    assert _import(tmp_path / "no-such-folder", env / "x") == 2
    # --project with DATA_DIR outside the data root is refused before any work
    monkeypatch.setenv("MAMMOFLAG_LABEL_STUDIO_TOKEN", "not-used")
    outside = tmp_path / "outside"
    assert _import(dicom_dir, outside, "--project", "Some project") == 2
    assert "not inside the data root" in capsys.readouterr().err
    assert not outside.exists()
    # no patient-key secret: refused, naming the variable
    monkeypatch.delenv("MAMMOFLAG_PATIENT_KEY_SECRET")
    assert _import(dicom_dir, env / "y") == 2
    assert "MAMMOFLAG_PATIENT_KEY_SECRET" in capsys.readouterr().err
    # a folder with nothing importable still completes
    empty = tmp_path / "only-junk"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    monkeypatch.setenv("MAMMOFLAG_PATIENT_KEY_SECRET", "s")
    assert _import(empty, env / "junk") == 0
    assert [r["status"] for r in _read_csv(env / "junk" / "import_report.csv")] == ["skipped"]
    assert json.loads((env / "junk" / "tasks.json").read_text()) == []


def test_synth_command(tmp_path, env, capsys):
    assert main(["synth", str(tmp_path / "demo"), "--studies", "2", "--size", "64", "--seed", "9"]) == 0
    rows = read_ground_truth(tmp_path / "demo" / "ground_truth.csv")
    assert rows and all((tmp_path / "demo" / r["file"]).is_file() for r in rows)
    assert "2 studies" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "demo")



def _intern_table_with_headroom() -> list[str]:
    """Make CPython's table of interned strings resize now, not inside a measured run.

    pathlib interns every path part, and interned strings leave dummies when freed, so the table
    resizes (a multi-MB allocation, whatever the run) at unpredictable moments. Interning strings
    (kept alive) until one resize is seen leaves the table at its freshest, with room to spare.
    """
    import sys
    import tracemalloc

    kept: list[str] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        while len(kept) < 2_000_000:
            kept.extend(sys.intern(f"headroom-{len(kept) + i}") for i in range(256))
            now = tracemalloc.get_traced_memory()[0]
            if now - before > 1_000_000 + 256 * 80:
                break  # the table was just reallocated
            before = now
    finally:
        tracemalloc.stop()
    return kept


def test_parent_memory_does_not_grow_with_the_number_of_files(tmp_path):
    """The parent keeps no per-file state in Python (manifest keys, claimed SOPs and earlier report rows
    live in SQLite): its peak Python heap importing 400 files is about that of 40, and so is a re-run's."""
    import tracemalloc

    import importers.run as run
    from mammoflag.dicom.types import NormalizeOptions

    # decoding runs in worker processes (always, even with workers=1): the parent's heap is the run's state
    def cohort_of(n_studies: int) -> Path:
        folder = tmp_path / f"dicom-{n_studies}"
        write_synthetic_cohort(folder, n_studies, seed=4, size=64, images_per_study=(4, 4), compressions=["none"],
                               multiframe=False)
        return folder

    def parent_peak(folder: Path, out: Path) -> tuple[int, int]:
        tracemalloc.start()
        try:
            summary = run.import_dicoms(folder, out, NormalizeOptions(long_side=64), "memory-secret", workers=1,
                                        progress=False)
            return tracemalloc.get_traced_memory()[1], summary.imported
        finally:
            tracemalloc.stop()

    small, large = cohort_of(10), cohort_of(100)
    run.import_dicoms(small, tmp_path / "warm-up", NormalizeOptions(long_side=64), "memory-secret", workers=1,
                      progress=False)  # first imports of pydicom, PIL, numpy ... are not the run's memory
    keep = _intern_table_with_headroom()  # noqa: F841 - alive while the runs are measured
    small_peak, small_imported = parent_peak(small, tmp_path / "out-small")
    large_peak, large_imported = parent_peak(large, tmp_path / "out-large")
    assert (small_imported, large_imported) == (40, 400)
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)
    resumed_peak, _ = parent_peak(large, tmp_path / "out-large")  # a re-run reads manifest and report back
    assert resumed_peak < 1.5 * small_peak, (small_peak, resumed_peak)


def test_duplicate_rule_keeps_the_first_copy_and_every_annotated_one():
    rows = [(5, "a:0", 0), (9, "a:0", 0), (7, "a:0", 1), (6, "b:0", 0), (3, "c:0", 0), (4, "c:0", 2)]
    # a: 5 stays (first), 7 stays (annotated), 9 goes; b: alone; c: 3 stays, 4 annotated stays
    assert duplicate_tasks_to_delete(rows) == ([9], 2)
    assert duplicate_tasks_to_delete(reversed(rows)) == ([9], 2)  # order of the listing does not matter
    assert duplicate_tasks_to_delete([]) == ([], 0)
