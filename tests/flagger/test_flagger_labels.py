"""The flagger reads human labels through the one label resolver: disputed is never a human label."""

from __future__ import annotations

from flagger.labels import labels_from_tasks
from label_config import load_label_config
from mammoflag.spec import ModelSpec

SPEC = ModelSpec.from_label_config(load_label_config())


def ann(id_, reader, *choices):
    return {"id": id_, "completed_by": reader, "was_cancelled": False, "updated_at": f"2026-01-0{id_}T00:00:00Z",
            "result": [{"from_name": SPEC.choices_name, "to_name": SPEC.image_name, "type": "choices",
                        "value": {"choices": list(choices)}}]}


def task(key, *annotations):
    return {"id": hash(key) % 1000, "data": {"key": key}, "annotations": list(annotations)}


def test_disputed_images_are_left_to_the_model_and_adjudication_wins():
    tasks = [task("a:0", ann(1, 1, "biopsy_tool")),  # one reader: stands
             task("b:0", ann(1, 1, "mag_view"), ann(2, 2, "mag_view")),  # agreement
             task("c:0", ann(1, 1, "biopsy_tool"), ann(2, 2, "neither")),  # disputed: the newest answer must not win
             task("d:0", ann(1, 1, "biopsy_tool"), ann(2, 2, "neither"), ann(3, 7, "biopsy_tool"))]  # adjudicated
    labels = labels_from_tasks(tasks, SPEC, adjudicators=frozenset({"7"}))
    assert labels.labels == {"a:0": (1, 0), "b:0": (0, 1), "d:0": (1, 0)}
    assert labels.disputed == 1 and "1 disputed" in labels.source_summary
    # without the adjudicator configured, d is disputed too
    assert set(labels_from_tasks(tasks, SPEC).labels) == {"a:0", "b:0"}
