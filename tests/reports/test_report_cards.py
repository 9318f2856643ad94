"""The report's calibration and learning curve come from the model cards: the out-of-fold reliability each
version recorded (nothing re-scored), and the learning curve split by how each version's labels were acquired."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from factories import tiny_model_version
from label_config import load_label_config
from mammoflag.card import UNCERTAINTY_SAMPLING, Acquisition, stand_in_card
from mammoflag.registry import FP32_FILE, Registry
from mammoflag.spec import ModelSpec
from reports.run import make_report
from training.calibrate import out_of_fold_metrics

SPEC = ModelSpec.from_label_config(load_label_config(), input_size=64)


def _oof(seed: int):
    rng = np.random.default_rng(seed)
    y = (rng.random((160, 2)) < 0.35).astype(float)
    logits = np.where(y > 0, 2.0, -2.0) * rng.uniform(0.5, 3.0, (160, 2)) + rng.normal(0, 1.0, (160, 2))
    return out_of_fold_metrics(logits, y, [f"p{i // 2}" for i in range(160)], SPEC.classes, 0.95)


def _registry(root: Path, acquisitions: list[dict[str, int] | None]) -> Registry:
    """Versions with hand-made cards: an out-of-fold estimate each (the first one an old card without
    reliability bins) and the given acquisition counts; the tiny model's ONNX file serves them all."""
    reg = Registry(root)
    onnx = tiny_model_version(root.parent / "tiny", SPEC).onnx_path
    for n, counts in enumerate(acquisitions):
        base = stand_in_card(SPEC, "card test")
        oof = _oof(n)
        if n == 0:
            oof = dataclasses.replace(oof, reliability={})
        acq = Acquisition(counts, UNCERTAINTY_SAMPLING, "2030-01-01T00:00:00Z") if counts is not None else None
        card = dataclasses.replace(
            base, label_count=40 * (n + 1), created_at=f"2030-01-0{n + 1}T00:00:00Z",
            metrics=dataclasses.replace(base.metrics, out_of_fold=oof, mean_auroc=0.6 + 0.05 * n),
            data=dataclasses.replace(base.data, acquisition=acq))
        with reg.staging() as staging:
            shutil.copy(onnx, staging / FP32_FILE)
            version = reg.publish(staging, card)
        reg.set_current(version.name)
    return reg


def test_calibration_is_the_cards_out_of_fold_reliability(tmp_path):
    reg = _registry(tmp_path / "models", [{"random": 40}, {"random": 60, "model-ordered": 20}, {"random": 60, "model-ordered": 60}])
    result = make_report((), reg, "cards", tmp_path / "out", resamples=50)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    versions = reg.versions()
    rows = {(r["version"], r["cls"]): r for r in report["calibration"]}
    # every version whose card has the bins, every class; the old card is named as lacking them
    assert set(rows) == {(v.name, c) for v in versions[1:] for c in SPEC.classes}
    assert [m.split(":")[0] for m in report["calibration_missing"]] == [versions[0].name]
    for v in versions[1:]:
        oof = v.card.metrics.out_of_fold
        for c in SPEC.classes:
            row, rel = rows[(v.name, c)], oof.reliability[c]
            assert row["before"]["bins"] == json.loads(json.dumps(dataclasses.asdict(rel.before)))["bins"]
            assert row["after"]["ece"] == pytest.approx(oof.per_class[c].ece)
            assert row["n"] == sum(oof.fold_sizes) and "out of fold" in row["split"] and "by patient" in row["split"]
            assert row["positives"] == oof.per_class[c].confusion.tp + oof.per_class[c].confusion.fn
    html = result.index.read_text()
    v = versions[2].name
    assert f'data-ece-after="{v}:biopsy_tool">{rows[(v, "biopsy_tool")]["after"]["ece"]:.4f}<' in html
    assert (tmp_path / "out" / "figures" / f"reliability-{v}-biopsy_tool.png").exists()
    assert "predates the out-of-fold reliability diagram" in html

    # learning curve: random-order and active-learning versions both exist
    orders = {p["version"]: p["order"] for p in report["learning"]}
    assert orders == {versions[0].name: "random order", versions[1].name: "active learning",
                      versions[2].name: "active learning"}
    assert report["learning_orders"].startswith("both orders exist: 1 version(s)")
    assert f'data-order="{versions[1].name}">active learning<' in html and "25% model-ordered" in html


def test_one_order_only_is_said_plainly(tmp_path):
    reg = _registry(tmp_path / "models", [{"random": 40}, {"random": 80}, None])
    make_report((), reg, "cards", tmp_path / "out", resamples=50)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["learning_orders"].startswith("only random order exists (2 version(s)): no comparison")
    assert "1 version(s) do not record" in report["learning_orders"]
    html = (tmp_path / "out" / "index.html").read_text()
    assert "only random order exists" in html
