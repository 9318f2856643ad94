"""Generator shift: train with every default on one synthetic family, judge on another.

The ``standard`` and ``shifted`` families (importers/synthetic.py) draw different worlds: other
marker size and shape mixtures, contrasts, placements (more cut by the edge), distractors, mag
view zooms and paddles, breasts, vendors and vendor looks. A model that learned the generator's
shortcuts instead of the findings does well on its own family and fails here. Sizes are CI
sizes (display long side 512, ~120 labelled images; a few minutes on 2 cores): the full-size
figures are benchmarks/bench_generalisation.py's (benchmarks/results/generalisation.json).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TRAIN_FAMILY, TEST_FAMILY = "standard", "shifted"
# Stated floors on the other family's images (chance is 0.5). mag_view is a property of the whole
# field and transfers; biopsy_tool is issue 13's open gap, kept as a strict xfail so that the day it
# transfers the test says so.
MAG_VIEW_MIN_AUROC = 0.75  # measured 0.78 at these sizes (2026-12-01, the same on the code before header evidence;
# 0.85 two sessions earlier); 0.88-0.93 at full size (image alone), 0.93-0.97 with header evidence
HEADER_MAX_COST = 0.03  # how much AUROC header evidence may cost mag_view on the slipped family (see its test)
BIOPSY_TARGET_AUROC = 0.80  # measured 0.65-0.67 at these sizes with the pretext start


def _cohort(root, data_root, family, studies, seed, spec):
    from importers.run import import_dicoms
    from importers.synthetic import read_ground_truth, write_synthetic_cohort
    from ls_helpers import export_from_truth, truth_by_key
    from mammoflag.dicom.types import NormalizeOptions

    gt = write_synthetic_cohort(root / f"{family}-dicom", studies, seed=seed, size=512, family=family,
                                compressions=("none",), multiframe=False)
    out = data_root / f"shift-{family}-{seed}"
    import_dicoms(root / f"{family}-dicom", out, NormalizeOptions(long_side=512), "shift-test-secret",
                  data_root=data_root, workers=1, progress=False)
    tasks = json.loads((out / "tasks.json").read_text())
    export = root / f"{family}-export.json"
    export.write_text(json.dumps(export_from_truth(tasks, truth_by_key(read_ground_truth(gt)), spec)))
    return out, export, {f"{r['sop_instance_uid']}:{r['frame']}": r for r in read_ground_truth(gt)}


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory, data_root):
    """(classes, image-only probabilities, probabilities with header evidence, truth, spec) of a default model
    trained on one family, scored on the other's images (whose headers slip: importers/synthetic.py SHIFTED)."""
    import csv

    from mammoflag.header_evidence import header_matrix
    from mammoflag.inference import OnnxClassifier
    from mammoflag.preprocess import load_display_image
    from mammoflag.registry import Registry
    from mammoflag.settings import Settings
    from mammoflag.spec import ModelSpec
    from training.dataset import labelled_set_from_export
    from training.train import TrainConfig, train_version

    work = tmp_path_factory.mktemp("generator-shift")
    spec = ModelSpec.from_label_config(Settings.from_env({}).label_config())  # default input size
    _, train_export, _ = _cohort(work, data_root, TRAIN_FAMILY, 40, 3, spec)
    test_dir, _, truth = _cohort(work, data_root, TEST_FAMILY, 30, 4, spec)
    labelled = labelled_set_from_export(train_export, spec, data_root)
    result = train_version(labelled, spec, Registry(work / "models"), TrainConfig(threads=2))
    rows = list(csv.DictReader(open(test_dir / "manifest.csv", newline="")))
    classifier = OnnxClassifier(result.version)
    displays = [load_display_image(test_dir / r["image"]) for r in rows]
    probs = classifier.probabilities_for_displays(displays)
    with_header = classifier.probabilities_for_displays(displays, header_matrix(rows))
    y = np.array([[int(truth[r["key"]][c]) for c in spec.classes] for r in rows])
    return spec.classes, probs, with_header, y, result.version.spec


@pytest.fixture(scope="module")
def shifted_scores(shifted_run):
    classes, probs, _, y, _ = shifted_run
    return classes, probs, y


def _auroc(shifted_scores, cls):
    from training.calibrate import auroc

    classes, probs, y = shifted_scores
    k = classes.index(cls)
    assert 0 < y[:, k].sum() < len(y), f"the {TEST_FAMILY} cohort needs both outcomes of {cls}"
    return auroc(probs[:, k], y[:, k])


def test_mag_view_transfers_to_another_generator_family(shifted_scores):
    value = _auroc(shifted_scores, "mag_view")
    print(f"{TRAIN_FAMILY} -> {TEST_FAMILY}: mag_view AUROC {value:.3f}, biopsy_tool AUROC "
          f"{_auroc(shifted_scores, 'biopsy_tool'):.3f}")  # shown with pytest -s
    assert value >= MAG_VIEW_MIN_AUROC, f"mag_view AUROC on {TEST_FAMILY} after training on {TRAIN_FAMILY}: {value:.3f}"


@pytest.mark.xfail(strict=True, reason="issue 13: biopsy_tool does not transfer across generator families yet "
                                       "(benchmarks/results/generalisation.json)")
def test_biopsy_tool_transfers_to_another_generator_family(shifted_scores):
    value = _auroc(shifted_scores, "biopsy_tool")
    assert value >= BIOPSY_TARGET_AUROC, f"biopsy_tool AUROC on {TEST_FAMILY}: {value:.3f}"


def test_header_evidence_does_not_cost_the_image_its_ranking_on_another_family(shifted_run):
    """The header weights were fitted on the training family's headers (consistent); the other family's
    slip (mag views coded as contact views). Fused with the header, mag_view must still rank at least as the
    image alone does, and a class whose header says nothing must be left alone."""
    from training.calibrate import auroc

    classes, probs, with_header, y, spec = shifted_run
    k = classes.index("mag_view")
    fused, image = auroc(with_header[:, k], y[:, k]), auroc(probs[:, k], y[:, k])
    print(f"mag_view AUROC on {TEST_FAMILY}: image {image:.3f}, with header evidence {fused:.3f}; header weights "
          f"{dict(spec.header_weights)}")
    # ~10 mag positives among ~90 images: 0.01 of AUROC is ~8 positive/negative pairs changing order. Header
    # weights fitted where headers are consistent cost the slipped family 0.022 here (image 0.791, fused 0.769,
    # 2026-12-03, after the tile start followed the declared kinds); 0.03 bounds that cost, and the fused score
    # must still clear the stated floor
    assert fused >= image - HEADER_MAX_COST and fused >= MAG_VIEW_MIN_AUROC
    for c in classes:
        if c not in spec.header_weights:
            np.testing.assert_allclose(with_header[:, classes.index(c)], probs[:, classes.index(c)])
