"""`mammoflag report`: its figures match the data they were built from, and the HTML opens from disk
in headless Chromium with every section present (a screenshot is kept with MAMMOFLAG_TEST_SHOTS)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from factories import tiny_model_version
from label_config import load_label_config
from mammoflag.agreement import cohen_kappa, fleiss_kappa
from mammoflag.inference import OnnxClassifier
from mammoflag.paths import task_url_for
from mammoflag.registry import Registry
from mammoflag.spec import ModelSpec
from mammoflag.stats import wilson_interval
from reports.inputs import records_from_tasks
from reports.render import SECTIONS
from reports.run import make_report

BEFORE, AFTER = "2000-01-01T00:00:00Z", "2099-01-01T00:00:00Z"  # read before / after the versions were made
SPEC = ModelSpec.from_label_config(load_label_config(), input_size=64)


def write_display(path: Path, bright: int, seed: int) -> Path:
    """A small grey 'mammogram': dim noise with a square 'marker' of the given brightness."""
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 40, size=(96, 64), dtype=np.uint8)
    img[40:48, 20:28] = bright
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path
# per task: marker brightness (255 -> the tiny model flags both classes, 40 -> neither, 150 -> unsure),
# site, manufacturer, header view modifiers, and each reader's answer
B, M, N = ["biopsy_tool"], ["mag_view"], ["neither"]
TASKS = [
    (255, "siteA", "Hologic", ["magnification"], {1: B, 2: B}),
    (255, "siteA", "Hologic", [], {1: B, 2: B, 3: B}),
    (40, "siteA", "Hologic", ["magnification"], {1: N, 2: N}),
    (40, "siteA", "GE", [], {1: N, 2: B}),
    (255, "siteB", "GE", [], {1: B + M, 2: B}),
    (40, "siteB", "GE", [], {1: N, 3: N}),
    (150, "siteB", "GE", ["spot_compression"], {2: N}),
    (255, "siteB", "Siemens", [], {1: B, 3: B}),
    (40, "siteB", "Siemens", [], {3: B}),
    (40, "siteA", "Siemens", [], {1: N, 2: N, 3: N}),
]


def _ann(aid: int, reader: int, choices: list[str], when: str) -> dict:
    return {"id": aid, "completed_by": reader, "created_at": when, "updated_at": when, "was_cancelled": False,
            "result": [{"from_name": "findings", "to_name": "image", "type": "choices", "value": {"choices": choices}}]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data_root, models = root / "data", root / "models"
    tasks = []
    for i, (bright, site, maker, mods, reads) in enumerate(TASKS):
        png = write_display(data_root / site / "images" / f"{i:03d}" / "0.png", bright, seed=i)
        when = AFTER if i % 5 else BEFORE  # tasks 0 and 5 were read before the models existed
        tasks.append({"id": 100 + i, "data": {
            "image": task_url_for(png, data_root), "key": f"1.2.3.{i}:0", "manufacturer": maker, "model": "M1",
            "view_modifiers": mods, "image_type": ["ORIGINAL", "PRIMARY", ""], "view_position": "CC",
            "laterality": "L", "patient_key": f"p{i}"},
            "annotations": [_ann(1000 + 10 * i + r, r, c, when) for r, c in reads.items()]})
    old = tiny_model_version(models, SPEC, make_current=False, bias=-4.0)
    current = tiny_model_version(models, SPEC, make_current=True)
    records = records_from_tasks(tasks, SPEC, data_root)
    result = make_report(records, Registry(models), "report test", root / "out", resamples=300)
    report = json.loads((root / "out" / "report.json").read_text())
    return {"result": result, "report": report, "records": records, "current": current, "old": old,
            "index": result.index}


def test_figures_match_the_data(built):
    report, records, current = built["report"], built["records"], built["current"]
    assert report["judged_version"] == current.name and report["tasks_read"] == len(TASKS)
    # labels: task 3 is disputed (N vs B), task 4 too (B+M vs B), the rest single or consensus
    assert report["label_status"] == {"single": 2, "consensus": 6, "disputed": 2, "adjudicated": 0, "unusable": 0}

    # agreement, by hand from TASKS: biopsy_tool yes-counts and reader counts of the double-read tasks
    multi = [r for *_, r in TASKS if len(r) >= 2]
    yes = [sum("biopsy_tool" in c for c in r.values()) for r in multi]
    biopsy = report["agreement"]["biopsy_tool"]
    assert biopsy["double_read_tasks"] == 8
    assert biopsy["fleiss"]["kappa"] == pytest.approx(fleiss_kappa(yes, [len(r) for r in multi]))
    both = [r for *_, r in TASKS if 1 in r and 2 in r]
    pair = next(p for p in biopsy["pairs"] if (p["reader_a"], p["reader_b"]) == ("1", "2"))
    assert pair["estimate"]["tasks"] == len(both) == 6
    assert pair["estimate"]["kappa"] == pytest.approx(cohen_kappa(["biopsy_tool" in r[1] for r in both],
                                                                  ["biopsy_tool" in r[2] for r in both]))
    lo, hi = pair["estimate"]["ci95"] or (None, None)
    assert lo is None or lo <= pair["estimate"]["kappa"] <= hi

    # the model's own decisions on every image, computed here independently of the report
    from PIL import Image

    model = OnnxClassifier(current)
    probs = model.probabilities_for_displays([np.asarray(Image.open(r.image).convert("L")) for r in records],
                                             np.array([r.evidence for r in records]))
    flagged = probs >= np.array([SPEC.thresholds.get(c, 0.5) for c in SPEC.classes])
    # reader 3 against the model on biopsy_tool
    r3 = [(i, "biopsy_tool" in r.reads["3"]) for i, r in enumerate(records) if "3" in r.reads]
    assert biopsy["reader_vs_model"]["3"]["kappa"] == pytest.approx(
        cohen_kappa([a for _, a in r3], [bool(flagged[i, 0]) for i, _ in r3]), nan_ok=True) \
        if biopsy["reader_vs_model"]["3"]["kappa"] is not None else True

    # subgroups: held-out (read after the version) human-labelled images of site B, biopsy_tool
    held = [i for i, r in enumerate(records) if i % 5 and r.resolution.is_human_label]
    site_b = [i for i in held if records[i].site == "siteB"]
    y = np.array(["biopsy_tool" in records[i].resolution.choices for i in site_b])
    f = flagged[site_b, 0]
    tp, fn = int((f & y).sum()), int((~f & y).sum())
    row = next(s for s in report["subgroups"] if (s["grouping"], s["value"], s["cls"]) == ("site", "siteB", "biopsy_tool"))
    assert row["positives"] == tp + fn and row["n"] == len(site_b)
    assert tuple(row["sensitivity_ci95"]) == pytest.approx(wilson_interval(tp, tp + fn))
    assert "needs about" in row["note"] and row["positives_needed"] > tp + fn  # a handful of images never suffices
    assert report["subgroup_images"] == len(held)

    # calibration: the hand-set versions' cards have no out-of-fold estimate, and the report says so
    assert report["calibration"] == []
    assert sorted(m.split(":")[0] for m in report["calibration_missing"]) == sorted([built["old"].name, current.name])
    # and, for comparison, both versions on the same held-out images; the old version differs only in its bias
    cal = {(c["version"], c["cls"]): c for c in report["held_out_calibration"]}
    assert set(cal) == {(v, c) for v in (built["old"].name, current.name) for c in SPEC.classes}
    assert cal[(current.name, "biopsy_tool")]["n"] == len(held)
    assert all(sum(b["n"] for b in c["before"]["bins"]) == c["n"] for c in cal.values())

    # header against model: the magnification header on a dark image (task 2, no mag flag) and none on
    # bright images the model calls mag_view
    audit = {(a["manufacturer"], a["header_field"]): a for a in report["audit"]}
    mag_all = audit[("(all)", "magnification")]
    header_mag = [i for i, t in enumerate(TASKS) if "magnification" in t[3]]
    assert mag_all["images"] == len(TASKS)
    assert mag_all["header_yes_model_no"] == sum(1 for i in header_mag if not flagged[i, 1])
    assert mag_all["header_no_model_yes"] == sum(1 for i in range(len(TASKS)) if flagged[i, 1] and i not in header_mag)
    assert audit[("Hologic", "magnification")]["images"] == 3

    # learning curve: both versions; thumbnails of flagged and uncertain images
    assert {p["version"] for p in report["learning"]} == {built["old"].name, current.name}
    kinds = {t["kind"] for t in report["thumbs"]}
    assert kinds == {"flagged", "uncertain"}
    # class activation maps: one forward pass gives the served logits and maps that peak on the marker
    from mammoflag.preprocess import model_input_batch
    from reports.cam import class_maps, load_cam_model

    cam = load_cam_model(current.onnx_path)
    batch = model_input_batch([np.asarray(Image.open(records[1].image).convert("L"))], SPEC.input_size)
    logits, maps = class_maps(cam, batch)
    assert np.allclose(logits, model.logits(batch), atol=1e-4)
    peak = np.unravel_index(maps[0, 0].argmax(), maps[0, 0].shape)
    assert batch[0, 1][peak] == batch[0, 1].max()  # the bright marker, not the dim noise around it
    out = built["index"].parent
    for t in report["thumbs"]:
        assert (out / "cams" / f"task-{t['task_id']}-{t['cls']}.png").exists()

    # no patient identifier: the patient keys given to the tasks appear nowhere in the output
    text = "".join(p.read_text(errors="ignore") for p in built["index"].parent.rglob("*") if p.suffix in (".html", ".json"))
    assert not any(f'"p{i}"' in text or f">p{i}<" in text for i in range(len(TASKS)))


@pytest.mark.browser
def test_report_opens_from_disk_in_chromium(built, chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright

    index, report = built["index"], built["report"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(index.as_uri())
            for sid, title in SECTIONS:
                if sid == "cohort":
                    continue
                assert page.locator(f"section#{sid} h2").inner_text() == title
            # every figure and thumbnail loaded from disk
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
            assert broken == 0 and page.locator("img").count() >= 4
            # the numbers shown are the ones computed
            fleiss = report["agreement"]["biopsy_tool"]["fleiss"]["kappa"]
            assert page.locator('[data-fleiss="biopsy_tool"]').inner_text() == f"{fleiss:.3f}"
            row = next(s for s in report["subgroups"] if (s["grouping"], s["value"], s["cls"]) ==
                       ("site", "siteA", "biopsy_tool"))
            shown = page.locator('[data-sensitivity="site:siteA:biopsy_tool"]').inner_text()
            assert shown == ("n/a" if row["sensitivity"] is None else f"{row['sensitivity']:.2f}")
            assert page.locator('[data-status="disputed"]').inner_text() == "2"
            assert page.locator("img.cam").count() >= 1
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("MAMMOFLAG_TEST_SHOTS"):
        shutil.copy(tmp_path / "report.png", Path(os.environ["MAMMOFLAG_TEST_SHOTS"]) / "report.png")
