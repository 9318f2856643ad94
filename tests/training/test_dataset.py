"""Consensus, contradictions, skips, image resolution and the patient-grouped split."""

from __future__ import annotations

import json

import pytest

from drawing import write_export, write_labelled_pngs
from mammoflag.labels import LabelStatus, resolve
from training.dataset import DatasetError, labelled_set_from_export, labelled_set_from_tasks, split_of


def ann(id_, reader, *choices, cancelled=False, updated="2026-01-01T00:00:00Z"):
    return {"id": id_, "completed_by": reader, "was_cancelled": cancelled, "updated_at": updated,
            "result": [] if cancelled else [{"from_name": "findings", "to_name": "image", "type": "choices",
                                             "value": {"choices": list(choices)}}]}


def test_unanimous_readers_give_the_target(spec):
    agreed = resolve([ann(1, 1, "biopsy_tool", "mag_view"), ann(2, 2, "mag_view", "biopsy_tool")], spec)
    assert agreed.choices == {"biopsy_tool", "mag_view"} and agreed.readers == 2 and agreed.reason is None


def test_disagreement_is_disputed_with_the_answers(spec):
    agreed = resolve([ann(1, 1, "biopsy_tool"), ann(2, 2, "neither")], spec)
    assert agreed.choices is None and agreed.status is LabelStatus.DISPUTED and not agreed.is_human_label
    assert "disagree" in agreed.reason and "biopsy_tool" in agreed.reason and "neither" in agreed.reason


def test_majority_when_asked_for(spec):
    anns = [ann(1, 1, "mag_view"), ann(2, 2, "mag_view"), ann(3, 3, "neither")]
    assert resolve(anns, spec).choices is None
    assert resolve(anns, spec, min_agreement=0.6).choices == {"mag_view"}


def test_an_adjudicator_settles_a_dispute_and_wins_over_agreement(spec):
    disputed = [ann(1, 1, "biopsy_tool"), ann(2, 2, "neither")]
    settled = resolve([*disputed, ann(3, 9, "neither")], spec, adjudicators={"9"})
    assert settled.status is LabelStatus.ADJUDICATED and settled.choices == {"neither"} and settled.is_human_label
    # the adjudicator's word wins even where the readers agreed, and by email in older exports
    agreed = [ann(1, 1, "mag_view"), ann(2, 2, "mag_view")]
    by_email = {**ann(3, {"id": 9, "email": "lead@example.org"}, "neither")}
    assert resolve([*agreed, by_email], spec, adjudicators={"lead@example.org"}).choices == {"neither"}
    assert resolve(agreed, spec).status is LabelStatus.CONSENSUS
    assert resolve(agreed[:1], spec).status is LabelStatus.SINGLE
    # an adjudicator who is one of two disagreeing readers settles it too
    assert resolve(disputed, spec, adjudicators={"2"}).choices == {"neither"}


def test_neither_with_a_finding_is_contradictory(spec):
    agreed = resolve([ann(7, 1, "neither", "biopsy_tool")], spec)
    assert agreed.choices is None and "contradictory" in agreed.reason and "annotation 7" in agreed.reason


def test_cancelled_annotations_are_ignored(spec):
    assert resolve([ann(1, 1, cancelled=True)], spec).choices is None
    assert resolve([ann(1, 1, cancelled=True)], spec).reason is None  # simply unlabelled
    agreed = resolve([ann(1, 1, cancelled=True), ann(2, 2, "neither")], spec)
    assert agreed.choices == {"neither"} and agreed.readers == 1


def test_a_reader_counts_once_with_their_latest_answer(spec):
    anns = [ann(1, 1, "neither", updated="2026-01-01T00:00:00Z"),
            ann(2, 1, "biopsy_tool", updated="2026-01-02T00:00:00Z"), ann(3, 2, "biopsy_tool")]
    agreed = resolve(anns, spec)
    assert agreed.choices == {"biopsy_tool"} and agreed.readers == 2


def test_choices_outside_the_label_config_are_left_out(spec):
    agreed = resolve([ann(4, 1, "calcification")], spec)
    assert agreed.choices is None and "calcification" in agreed.reason


def test_every_task_is_accounted_for(tmp_path, spec):
    data_root = tmp_path / "data"
    tasks = write_labelled_pngs(data_root / "a", data_root, 6, seed=1)
    tasks[0]["annotations"] = [ann(100, 1, "biopsy_tool"), ann(101, 2, "neither")]  # disagreement
    tasks[1]["annotations"] = [ann(102, 1, "neither", "mag_view")]  # contradictory
    tasks[2]["annotations"] = [ann(103, 1, cancelled=True)]  # skipped only: unlabelled
    tasks[3]["data"]["image"] = "/data/local-files/?d=../../etc/passwd"  # outside the data root
    (data_root / "a" / "img0004.png").unlink()  # file gone
    labelled = labelled_set_from_tasks(tasks, spec, data_root, "test")
    assert len(labelled.items) == 1 and labelled.items[0].task_id == 6
    assert labelled.unlabelled == 1
    reasons = {x.task_id: x.reason for x in labelled.left_out}
    assert set(reasons) == {1, 2, 4, 5}
    assert "disagree" in reasons[1] and "contradictory" in reasons[2]
    assert "outside the data root" in reasons[4] and "data.image" in reasons[4]
    assert "no such file" in reasons[5] and str(data_root) not in reasons[5]
    assert len(labelled.items) + len(labelled.left_out) + labelled.unlabelled == len(tasks)
    # the one double-read task: the readers split on biopsy_tool, and both said no mag_view
    agreement = labelled.reader_agreement
    assert agreement["double_read_tasks"] == 1
    assert agreement["per_class"]["biopsy_tool"]["tasks_all_agree"] == 0
    assert agreement["per_class"]["mag_view"]["tasks_all_agree"] == 1


def test_targets_follow_spec_class_order(tmp_path, spec):
    data_root = tmp_path / "data"
    tasks = write_labelled_pngs(data_root / "a", data_root, 3, seed=2)
    tasks[0]["annotations"] = [ann(1, 1, "mag_view")]
    tasks[1]["annotations"] = [ann(2, 1, "neither")]
    tasks[2]["annotations"] = [ann(3, 1, "biopsy_tool", "mag_view")]
    items = labelled_set_from_tasks(tasks, spec, data_root, "t").items
    assert spec.classes == ("biopsy_tool", "mag_view")
    assert [i.target for i in items] == [(0.0, 1.0), (0.0, 0.0), (1.0, 1.0)]


def test_export_file_round_trip_and_bad_files(tmp_path, spec):
    data_root = tmp_path / "data"
    tasks = write_labelled_pngs(data_root / "a", data_root, 5, seed=3)
    labelled = labelled_set_from_export(write_export(tasks, tmp_path / "export.json"), spec, data_root)
    assert len(labelled.items) == 5 and labelled.annotations == 5 and labelled.source == "export export.json"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json.*not valid JSON"):
        labelled_set_from_export(tmp_path / "bad.json", spec, data_root)
    (tmp_path / "obj.json").write_text(json.dumps({"tasks": []}))
    with pytest.raises(DatasetError, match="obj.json.*JSON list"):
        labelled_set_from_export(tmp_path / "obj.json", spec, data_root)


def test_split_is_deterministic_grouped_and_near_the_fraction(tmp_path, spec):
    groups = [f"patient_key:{i:05d}" for i in range(4000)]
    first = [split_of(g) for g in groups]
    assert first == [split_of(g) for g in groups]  # the same every run: a pure hash
    share = first.count("valid") / len(first)
    assert 0.18 < share < 0.22
    # a patient's images all land on one side, whatever else is in the set
    data_root = tmp_path / "data"
    tasks = write_labelled_pngs(data_root / "a", data_root, 40, seed=4, patients=7)
    labelled = labelled_set_from_tasks(tasks, spec, data_root, "t")
    train, valid = labelled.split()
    assert {i.group for i in train}.isdisjoint({i.group for i in valid})
    # adding labels never moves an existing image across the split
    smaller = labelled_set_from_tasks(tasks[:20], spec, data_root, "t")
    _, small_valid = smaller.split()
    assert {i.key for i in small_valid} <= {i.key for i in valid}


def test_fingerprint_changes_with_labels_not_order(tmp_path, spec):
    data_root = tmp_path / "data"
    tasks = write_labelled_pngs(data_root / "a", data_root, 6, seed=5)
    a = labelled_set_from_tasks(tasks, spec, data_root, "t").fingerprint
    assert a == labelled_set_from_tasks(list(reversed(tasks)), spec, data_root, "t").fingerprint
    tasks[0]["annotations"] = [ann(9, 1, "biopsy_tool", "mag_view")]
    assert a != labelled_set_from_tasks(tasks, spec, data_root, "t").fingerprint
