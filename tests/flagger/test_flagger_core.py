"""Cohort flagging on a known synthetic cohort: exact study flags, human overrides, errors, cohort export."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from flagger.cohort import Condition, export_cohort
from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger.labels import labels_from_export_file
from flagger_cohorts import KNOWN_STUDIES, expected_classes, read_csv, reference_study_flags, uid
from label_config import load_label_config
from mammoflag.registry import resolve_model

QUIET = FlagOptions(workers=0, batch_size=8, progress=False)


def _study_flags(rows: list[dict[str, str]], classes) -> dict[str, tuple[int, ...]]:
    return {r["study_id"]: tuple(int(r[f"flag_{c}"]) for c in classes) for r in rows}


def _copy_cohort(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_known_cohort_gives_exact_study_flags(known_cohort, tiny_registry, tmp_path):
    version = resolve_model(tiny_registry)
    classes = version.spec.classes
    out = FlagOutputs(tmp_path / "flags.csv", images=tmp_path / "images.csv")
    summary = flag_cohort(known_cohort, version, out, label_config=load_label_config(),
                          options=FlagOptions(workers=1, batch_size=4, progress=False))

    by_construction = {
        uid(0, "study", s): tuple(max(expected_classes(v)[c] for v in spots) for c in range(2))
        for s, spots in enumerate(KNOWN_STUDIES)
    }
    reference = reference_study_flags(known_cohort, version.onnx_path, version.spec)
    assert reference == by_construction  # the reference itself agrees with how the cohort was built
    rows = read_csv(out.flags)
    assert _study_flags(rows, classes) == reference
    assert len(rows) == len(KNOWN_STUDIES) == summary.studies
    assert summary.flagged == {"biopsy_tool": 5, "mag_view": 3} and summary.problems == 0

    header = list(rows[0])
    for cls in classes:  # columns follow the label config's classes
        for prefix in ("flag", "max_prob", "threshold", "source", "flagged_by"):
            assert f"{prefix}_{cls}" in header
    study = {r["study_id"]: r for r in rows}[uid(0, "study", 1)]
    assert study["image_count"] == "4" and study["threshold_biopsy_tool"] == "0.5"
    assert study["flagged_by_biopsy_tool"] == f"{uid(0, 'image', 1, 1)}:0 MLO L"
    assert study["source_biopsy_tool"] == "model" and study["model_version"] == version.name
    assert float(study["max_prob_biopsy_tool"]) >= float(study["threshold_biopsy_tool"])
    assert (float(study["max_prob_mag_view"]) >= float(study["threshold_mag_view"])) == (study["flag_mag_view"] == "1")

    images = read_csv(out.images)
    assert len(images) == sum(len(s) for s in KNOWN_STUDIES)
    mag_hinted = [r for r in images if r["header_mag_view"] == "1"]
    assert mag_hinted and all(r["model_flag_mag_view"] == "1" for r in mag_hinted)
    # header-vs-model disagreement is findable: model says mag view, header does not
    assert any(r["model_flag_mag_view"] == "1" and r["header_mag_view"] == "0" for r in images)
    assert read_csv(out.errors_path) == []


def test_bad_rows_go_to_the_errors_file_and_the_run_goes_on(known_cohort, tiny_registry, tmp_path):
    data = _copy_cohort(known_cohort, tmp_path / "data")
    rows = read_csv(data / "manifest.csv")
    rows[0]["study_instance_uid"] = ""  # a header field missing
    (data / rows[1]["image"]).write_bytes(b"not a png")  # a corrupt display image
    (data / rows[2]["image"]).unlink()  # a missing file
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    version = resolve_model(tiny_registry)
    out = FlagOutputs(tmp_path / "flags.csv")
    summary = flag_cohort(data, version, out, options=QUIET)
    errors = {e["unit"]: e for e in read_csv(out.errors_path)}
    assert set(errors) == {rows[0]["key"], rows[1]["key"], rows[2]["key"]}
    assert "study_instance_uid" in errors[rows[0]["key"]]["reason"]
    assert "missing" in errors[rows[2]["key"]]["reason"]
    assert errors[rows[1]["key"]]["path"] == rows[1]["image"]
    assert str(data) not in json.dumps(list(errors.values()))  # no absolute (possibly named) paths
    assert summary.images_stored == len(rows) - 3 and summary.problems == 3
    assert _study_flags(read_csv(out.flags), version.spec.classes) == \
        reference_study_flags(data, version.onnx_path, version.spec)


def _export(tasks: list[tuple[str, list[str]]]) -> list[dict]:
    """A Label Studio JSON export: one task per (image key, chosen values)."""
    return [{"id": i + 1, "data": {"key": key},
             "annotations": [{"id": 10 + i, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z",
                              "result": [{"from_name": "findings", "to_name": "image", "type": "choices",
                                          "value": {"choices": chosen}}]}]}
            for i, (key, chosen) in enumerate(tasks)]


def test_human_labels_override_the_model(known_cohort, tiny_registry, tmp_path):
    version = resolve_model(tiny_registry)
    spec = version.spec
    biopsy_image = f"{uid(0, 'image', 1, 1)}:0"  # the only image raising study 1's biopsy flag
    quiet_image = f"{uid(0, 'image', 0, 2)}:0"  # study 0: nothing visible to the model
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_export([(biopsy_image, ["neither"]), (quiet_image, ["mag_view"])])))
    labels = labels_from_export_file(export, spec)
    assert labels.labels == {biopsy_image: (0, 0), quiet_image: (0, 1)}

    out = FlagOutputs(tmp_path / "flags.csv", images=tmp_path / "images.csv")
    summary = flag_cohort(known_cohort, version, out, human_labels=labels, options=QUIET)
    rows = {r["study_id"]: r for r in read_csv(out.flags)}
    s0, s1 = rows[uid(0, "study", 0)], rows[uid(0, "study", 1)]
    assert (s1["flag_biopsy_tool"], s1["source_biopsy_tool"], s1["flagged_by_biopsy_tool"]) == ("0", "model", "")
    assert (s0["flag_mag_view"], s0["source_mag_view"]) == ("1", "human")
    assert s0["flagged_by_mag_view"].startswith(quiet_image) and s0["human_labelled_images"] == "1"
    assert float(s0["max_prob_mag_view"]) == 1.0
    assert _study_flags(read_csv(out.flags), spec.classes) == reference_study_flags(
        known_cohort, version.onnx_path, spec, human=labels.labels)
    assert summary.flagged_by_human == {"biopsy_tool": 0, "mag_view": 1}
    image_rows = {r["key"]: r for r in read_csv(out.images)}
    assert (image_rows[biopsy_image]["model_flag_biopsy_tool"], image_rows[biopsy_image]["human_biopsy_tool"],
            image_rows[biopsy_image]["flag_biopsy_tool"]) == ("1", "0", "0")


def test_rerun_with_the_same_model_skips_done_images(known_cohort, tiny_registry, tmp_path):
    version = resolve_model(tiny_registry)
    out = FlagOutputs(tmp_path / "flags.csv")
    first = flag_cohort(known_cohort, version, out, options=QUIET)
    flags_first = out.flags.read_text()
    second = flag_cohort(known_cohort, version, out, options=QUIET)
    assert first.units_processed == sum(len(s) for s in KNOWN_STUDIES)
    assert (second.units_done_before, second.units_processed) == (first.units_processed, 0)
    assert out.flags.read_text() == flags_first


def test_cohort_export_selects_and_summarises(known_cohort, tiny_registry, tmp_path):
    version = resolve_model(tiny_registry)
    out = FlagOutputs(tmp_path / "flags.csv")
    flag_cohort(known_cohort, version, out, options=QUIET)
    summary = export_cohort(out.flags, [], tmp_path / "any.csv")
    assert (summary.studies_in, summary.studies_out) == (len(KNOWN_STUDIES), 5)
    mag = export_cohort(out.flags, [Condition.parse("flag_mag_view=1"), Condition.parse("manufacturer~hologic")],
                        tmp_path / "mag.csv")
    rows = read_csv(tmp_path / "mag.csv")
    assert all(r["flag_mag_view"] == "1" and r["manufacturer"].startswith("HOLOGIC") for r in rows)
    assert mag.studies_out == len(rows) and mag.by_manufacturer["HOLOGIC, Inc."]["studies"] == len(rows)
    assert "mag_view" in mag.format() and "HOLOGIC" in mag.format()
    with pytest.raises(ValueError, match="no such column"):
        export_cohort(out.flags, [Condition.parse("flag_nonsense=1")], tmp_path / "x.csv")


def test_cohort_command(known_cohort, tiny_registry, tmp_path, capsys, monkeypatch):
    from mammoflag.cli import main

    monkeypatch.setenv("MAMMOFLAG_HOME", str(tmp_path / "home"))
    assert main(["flag", str(known_cohort), "--model", str(tiny_registry), "--out", str(tmp_path / "flags.csv"),
                 "--workers", "0", "--no-progress"]) == 0
    assert "flagged biopsy_tool: 5 studies" in capsys.readouterr().out
    assert main(["cohort", str(tmp_path / "flags.csv"), "--where", "max_prob_biopsy_tool >= 0.5",
                 "--where", "flag_mag_view=0", "--out", str(tmp_path / "cohort.csv")]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(tmp_path / "cohort.csv")
    assert len(rows) == 2 and all(r["flag_biopsy_tool"] == "1" and r["flag_mag_view"] == "0" for r in rows)
    assert "cohort: 2 of 8 studies" in printed and "by manufacturer:" in printed
    assert main(["cohort", str(tmp_path / "flags.csv"), "--where", "nonsense", "--out", str(tmp_path / "x.csv")]) == 2


def test_int8_model_is_used_when_the_registry_kept_one(known_cohort, tiny_registry, tmp_path):
    from mammoflag.preprocess import load_display_image, model_input_batch
    from mammoflag.registry import INT8_FILE, read_version
    from training.export import quantize_static_int8

    folder = tmp_path / "v-int8"
    shutil.copytree(resolve_model(tiny_registry).path, folder)
    pngs = sorted(known_cohort.glob("images/*/0.png"))[:8]
    quantize_static_int8(folder / "model.onnx", folder / INT8_FILE,
                         model_input_batch([load_display_image(p) for p in pngs], 64))
    card = json.loads((folder / "model.json").read_text())
    card["int8"] = {"kept": True, "reason": "test"}
    (folder / "model.json").write_text(json.dumps(card))  # the card's JSON form is its contract on disk
    version = read_version(folder)
    assert version.model_file(prefer_int8=True).name == INT8_FILE

    out = FlagOutputs(tmp_path / "int8" / "flags.csv")
    summary = flag_cohort(known_cohort, version, out, options=QUIET)
    rows = read_csv(out.flags)
    assert summary.model_file == INT8_FILE and {r["model_variant"] for r in rows} == {"int8"}
    assert _study_flags(rows, version.spec.classes) == reference_study_flags(
        known_cohort, folder / INT8_FILE, version.spec)
    # the fp32 run keeps its own checkpoint rows beside the INT8 ones
    fp32 = flag_cohort(known_cohort, version, out, options=FlagOptions(workers=0, prefer_int8=False, progress=False))
    assert fp32.units_done_before == 0 and {r["model_variant"] for r in read_csv(out.flags)} == {"fp32"}


def test_a_checkpoint_serves_one_run_and_one_input(known_cohort, tiny_registry, tmp_path):
    from flagger.checkpoint import Checkpoint, CheckpointBusy, CheckpointMismatch

    version = resolve_model(tiny_registry)
    out = FlagOutputs(tmp_path / "flags.csv")
    with Checkpoint(out.checkpoint_path):
        with pytest.raises(CheckpointBusy):
            flag_cohort(known_cohort, version, out, options=QUIET)
    flag_cohort(known_cohort, version, out, options=QUIET)
    other = _copy_cohort(known_cohort, tmp_path / "other")
    with pytest.raises(CheckpointMismatch, match="another input"):
        flag_cohort(other, version, out, options=QUIET)


def test_decode_processes_default_per_input_kind(monkeypatch):
    from flagger.core import decode_workers_for

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert decode_workers_for(FlagOptions(), "dicom") == 2
    assert decode_workers_for(FlagOptions(), "display") == 2
    # on many cores the decoders are capped: each holds ~100-230 MB and the run must stay under 1 GB
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert decode_workers_for(FlagOptions(), "dicom") == 4
    assert decode_workers_for(FlagOptions(), "display") == 2
    # an explicit choice always wins, 0 included (decode in the calling process)
    assert decode_workers_for(FlagOptions(workers=0), "dicom") == 0
    assert decode_workers_for(FlagOptions(workers=3), "display") == 3
