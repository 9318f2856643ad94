"""How the labels a version was trained on were acquired: counted into its model card from the first answer's
time, the project's sampling setting and when a model of the project first became current (the registry)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from label_config import load_label_config
from mammoflag.card import (UNCERTAINTY_SAMPLING, UNIFORM_SAMPLING, Acquisition, AcquisitionOrder, ModelCard,
                            PromotionSection, acquisition_order, first_current_at, stand_in_card)
from mammoflag.registry import Registry
from mammoflag.spec import ModelSpec
from training.dataset import labelled_set_from_tasks
from training.modelcard import acquisition_of

SPEC = ModelSpec.from_label_config(load_label_config(), input_size=64)


def _publish(reg: Registry, created_at: str, project_id: int | None, became_current: bool) -> str:
    card = stand_in_card(SPEC, "acquisition test")
    card = dataclasses.replace(card, created_at=created_at,
                               data=dataclasses.replace(card.data, project_id=project_id),
                               promotion=PromotionSection(became_current, "test"))
    with reg.staging() as staging:
        version = reg.publish(staging, card)
    if became_current:
        reg.set_current(version.name)
    return version.name


def _tasks(tmp_path: Path, times: list[str]) -> list[dict]:
    from PIL import Image

    tasks = []
    for i, when in enumerate(times):
        png = tmp_path / "data" / "imp" / f"{i}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(png)
        anns = [{"id": 10 * i + 1, "completed_by": 1, "created_at": when, "was_cancelled": False,
                 "result": [{"from_name": SPEC.choices_name, "to_name": SPEC.image_name, "type": "choices",
                             "value": {"choices": ["neither"]}}]}]
        if i == 0:  # a second, later answer of another reader: the first answer decides
            anns.append({**anns[0], "id": 10 * i + 2, "completed_by": 2, "created_at": "2031-01-01T00:00:00.000Z"})
        tasks.append({"id": i + 1, "data": {"image": f"/data/local-files/?d=imp/{i}.png", "key": f"1.2.{i}:0",
                                            "patient_key": f"p{i}"}, "annotations": anns})
    return tasks


def test_labels_count_by_the_order_they_were_served_in(tmp_path):
    reg = Registry(tmp_path / "models")
    _publish(reg, "2030-01-01T12:00:00Z", project_id=7, became_current=False)  # never current: orders nothing
    _publish(reg, "2030-01-02T12:00:00Z", project_id=8, became_current=True)  # another project's model
    first = _publish(reg, "2030-01-03T12:00:00Z", project_id=7, became_current=True)
    _publish(reg, "2030-01-05T12:00:00Z", project_id=7, became_current=True)
    assert first_current_at([v.card for v in reg.versions()], 7) == "2030-01-03T12:00:00Z"
    assert first_current_at([v.card for v in reg.versions()], None) is None

    times = ["2030-01-01T00:00:00.000Z", "2030-01-03T11:59:59Z", "2030-01-03T12:00:01.5+00:00",
             "2030-01-04T08:00:00Z", "2030-01-03T14:00:00+02:00"]  # the last is 12:00 UTC: not after
    labelled = labelled_set_from_tasks(_tasks(tmp_path, times), SPEC, tmp_path / "data", "project 7")
    assert [i.first_read_at for i in labelled.items] == times
    assert labelled.sampling is None  # tasks alone (an export) do not say how the queue was ordered

    parent = reg.current()
    unknown = acquisition_of(labelled, parent, 7)
    assert unknown.count(AcquisitionOrder.UNKNOWN) == 5 and unknown.sampling is None

    live = dataclasses.replace(labelled, sampling=UNCERTAINTY_SAMPLING)
    acq = acquisition_of(live, parent, 7)
    assert acq.ordered_since == "2030-01-03T12:00:00Z"
    assert (acq.count(AcquisitionOrder.RANDOM), acq.count(AcquisitionOrder.MODEL)) == (3, 2)
    assert sum(acq.counts.values()) == len(labelled.items)
    # no current version: no model ever ordered the queue
    assert acquisition_of(live, None, 7).count(AcquisitionOrder.RANDOM) == 5
    # images left out while loading are not counted
    from mammoflag.card import LeftOut

    fewer = acquisition_of(live, parent, 7, [LeftOut(4, "1.2.3:0", "test")])
    assert fewer.count(AcquisitionOrder.MODEL) == 1
    # uniform sampling is random whatever the time; sequential is its own order
    assert acquisition_of(dataclasses.replace(labelled, sampling=UNIFORM_SAMPLING), parent, 7) \
        .count(AcquisitionOrder.RANDOM) == 5
    assert acquisition_order("2030-01-04T00:00:00Z", "Sequential sampling", "2030-01-03T12:00:00Z") \
        is AcquisitionOrder.SEQUENTIAL
    assert acquisition_order(None, UNCERTAINTY_SAMPLING, None) is AcquisitionOrder.UNKNOWN


def test_the_card_keeps_the_acquisition_and_old_cards_load(tmp_path):
    card = stand_in_card(SPEC, "acquisition test")
    acq = Acquisition({"model-ordered": 4, "random": 20, "sequential": 0, "unknown": 1}, UNCERTAINTY_SAMPLING,
                      "2030-01-03T12:00:00Z")
    card = dataclasses.replace(card, data=dataclasses.replace(card.data, acquisition=acq))
    again = ModelCard.from_json(json.loads(json.dumps(card.to_json())))
    assert again.data.acquisition == acq and again == card
    old = card.to_json()
    del old["data"]["acquisition"]
    assert ModelCard.from_json(old).data.acquisition is None


@pytest.mark.parametrize("when", ["not a time", ""])
def test_an_unreadable_time_is_unknown(when):
    assert acquisition_order(when, UNCERTAINTY_SAMPLING, "2030-01-03T12:00:00Z") is AcquisitionOrder.UNKNOWN
