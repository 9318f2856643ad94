"""Training end to end on the synthetic cohort: accuracy on held-out patients, registry rules, parity refusal.

The cohort is the importer's synthetic DICOMs (60 studies, ~180 images) imported into the
session's data root and labelled from ground truth as a Label Studio JSON export. Models are
trained from random initialisation at input size 96 (no ImageNet weights exist offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ls_helpers import export_from_truth, truth_by_key
from mammoflag.card import AcquisitionOrder
from mammoflag.registry import Registry
from training.dataset import labelled_set_from_export
from training.export import ParityError
from training.train import TrainConfig, train_version

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Stated accuracy on the held-out (patient-hash validation) split, 96 px, 6 epochs, random init. At 64 px
# thin needles are a pixel wide and the biopsy AUROC swung between 0.59 and 0.80 with tiny changes to the
# display resize; at 96 px they stay visible. With ~10 validation positives the bar is "clearly learned"
# (chance is 0.5), not the best seen.
INPUT_SIZE = 96
MIN_AUROC = {"biopsy_tool": 0.65, "mag_view": 0.95}


@pytest.fixture(scope="module")
def training_export(tmp_path_factory, data_root, spec) -> Path:
    from importers.run import import_dicoms
    from importers.synthetic import read_ground_truth, write_synthetic_cohort
    from mammoflag.dicom.types import NormalizeOptions

    work = tmp_path_factory.mktemp("training-cohort")
    gt = write_synthetic_cohort(work / "dicom", 60, seed=7, size=320, biopsy_rate=0.5, mag_rate=0.4,
                                compressions=("none",))
    out = data_root / "training-cohort"
    import_dicoms(work / "dicom", out, NormalizeOptions(long_side=256), "training-test-secret", data_root=data_root,
                  workers=1, progress=False)
    tasks = json.loads((out / "tasks.json").read_text())
    export = work / "project-export.json"
    export.write_text(json.dumps(export_from_truth(tasks, truth_by_key(read_ground_truth(gt)), spec)))
    return export


@pytest.fixture(scope="module")
def trained(tmp_path_factory, training_export, data_root):
    """`mammoflag train --export ... --data-root ...` run as a user would: (registry root, stdout)."""
    home = tmp_path_factory.mktemp("train-home")
    env = {**os.environ, "MAMMOFLAG_HOME": str(home), "MAMMOFLAG_INPUT_SIZE": str(INPUT_SIZE), "MAMMOFLAG_TRAIN_EPOCHS": "6",
           "MAMMOFLAG_TRAIN_BATCH_SIZE": "16", "MAMMOFLAG_TRAIN_THREADS": "2"}
    models = home / "models"
    proc = subprocess.run([sys.executable, "-m", "mammoflag.cli", "train", "--export", str(training_export),
                           "--data-root", str(data_root), "--models", str(models)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return models, proc.stdout, proc.stderr


def test_cli_reaches_the_stated_accuracy_on_held_out_patients(trained, spec):
    models, stdout, stderr = trained
    version = Registry(models).current()
    assert version is not None and version.name in stdout and "current: yes" in stdout and "out of fold" in stdout
    card = version.card
    for c, floor in MIN_AUROC.items():
        assert card.metrics.per_class[c].auroc >= floor, card.metrics.per_class[c]
    assert "RANDOM INITIALISATION" in stderr  # no ImageNet weights offline: said loudly
    # random weights, the tile and whole-image networks started from their self-supervised pretexts
    # (training/pretext.py: pasted objects, zoomed crops)
    assert card.training.body_from == "pretext:400+zoom:200"
    assert card.training.details["zoom_start"]["mag_view"]["start"] == "zoom"
    # the verdicts come first, one per class, in words
    assert stdout.startswith("verdicts:")
    for c in spec.classes:
        assert f"{c}: {card.verdict(c).value.upper()}" in stdout


def test_model_card_holds_what_consumers_need(trained, spec):
    models, _, _ = trained
    version = Registry(models).current()
    card = version.card
    assert card.spec.classes == tuple(spec.classes) and card.spec.input_size == INPUT_SIZE
    assert set(card.spec.temperatures) == set(spec.classes) == set(card.spec.thresholds)
    n_valid = card.metrics.n_valid
    for c in spec.classes:
        m = card.metrics.per_class[c]
        assert m.sensitivity >= 0.95 or m.positives < 20  # threshold chosen for the target sensitivity
        assert m.sensitivity_ci95[0] <= m.sensitivity <= m.sensitivity_ci95[1]
        assert sum(vars(m.confusion).values()) == n_valid
        # the honest estimate: every validation image judged by a calibration fitted without it
        oof = card.metrics.out_of_fold.per_class[c]
        assert sum(vars(oof.confusion).values()) == n_valid
        assert oof.confusion.tp + oof.confusion.fn == m.positives
        # per vendor: every validation image in exactly one manufacturer's row
        by_maker = card.metrics.by_manufacturer
        assert sum(g.n for g in by_maker.values()) == n_valid
        assert sum(g.per_class[c].positives for g in by_maker.values()) == m.positives
        # the trust gate's figures are the card's own
        trust = card.trust.per_class[c]
        assert trust.positives == m.positives
        if c in card.spec.header_weights:  # fitted on these very images: the gate judges the AUROC out of fold
            assert trust.auroc is not None and "out-of-fold validation AUROC" in trust.reason
        else:
            assert trust.auroc == pytest.approx(m.auroc, abs=0.006) and "out-of-fold validation AUROC" \
                not in trust.reason
        assert trust.oof_sensitivity == oof.sensitivity and trust.reason
        # the out-of-fold reliability diagram, before and after temperature scaling, on the same images
        rel = card.metrics.out_of_fold.reliability[c]
        assert rel.before.n == rel.after.n == n_valid and rel.after.ece == pytest.approx(oof.ece)
        assert sum(b.n for b in rel.after.bins) == n_valid and len(rel.temperatures) == card.metrics.out_of_fold.folds
    # how the labels were acquired: an export does not say how its queue was ordered
    acq = card.data.acquisition
    assert acq is not None and acq.sampling is None and acq.count(AcquisitionOrder.UNKNOWN) == card.label_count
    assert len(card.metrics.by_manufacturer) >= 2  # the synthetic cohort has several vendors
    assert isinstance(card.data.reader_agreement, dict)
    assert card.label_count == card.data.split.n_train + card.data.split.n_valid > 150
    assert card.data_fingerprint and card.parent_version is None and card.created_at
    assert card.int8.reason and (version.path / "model.int8.onnx").exists() == card.int8.kept
    assert (version.path / "plots" / "roc.png").exists() and (version.path / "plots" / "reliability.png").exists()
    assert card.training.onnx_parity_max_diff <= 1e-4
    assert not list(models.glob(".staging-*"))


def test_served_model_agrees_with_the_card(trained, training_export, data_root, spec):
    """The registered ONNX model, loaded as the backend loads it (with each task's header evidence), reproduces
    the card's validation AUROC."""
    from mammoflag.inference import OnnxClassifier
    from mammoflag.preprocess import load_display_image
    from training.calibrate import auroc

    models, _, _ = trained
    version = Registry(models).current()
    labelled = labelled_set_from_export(training_export, spec, data_root)
    train, valid = labelled.split(version.card.data.split.valid_fraction)
    assert {i.group for i in train}.isdisjoint({i.group for i in valid})
    clf = OnnxClassifier(version, prefer_int8=True)
    probs = clf.probabilities_for_displays([load_display_image(i.image) for i in valid],
                                           np.array([i.header for i in valid]))
    y = np.array([i.target for i in valid])
    for k, c in enumerate(spec.classes):
        served = auroc(probs[:, k], y[:, k])
        # the card scores fp32; INT8 is only kept within 0.005 of it
        assert served == pytest.approx(version.card.metrics.per_class[c].auroc, abs=0.006)

    # novelty (mammoflag.novelty): a reference per served file; on the validation images it is the reference's
    # own quantile, and the training images are at distance 0 from themselves
    from mammoflag.preprocess import model_input_batch

    assert version.card.training.details["novelty"]["kept"]
    for prefer_int8 in (False, True):
        clf = OnnxClassifier(version, prefer_int8=prefer_int8)
        ref = clf.novelty_reference
        assert ref is not None and ref.model_file == clf.model_path.name and ref.n_validation == len(valid)
        x = model_input_batch([load_display_image(i.image) for i in valid], version.spec.input_size)
        _, novelty = clf.scores(x)
        assert novelty is not None and int((novelty >= 1 - 1e-6).sum()) == ref.k
        _, own = clf.scores(model_input_batch([load_display_image(i.image) for i in train[:8]],
                                              version.spec.input_size))
        assert own is not None and np.allclose(own, 0.0, atol=1e-3)


def test_a_worse_model_stays_a_candidate(trained, training_export, data_root, spec):
    models, _, _ = trained
    registry = Registry(models)
    before = registry.current_name()
    labelled = labelled_set_from_export(training_export, spec, data_root)
    # one frozen epoch on a random body at a tiny learning rate: barely better than chance
    weak = TrainConfig(mode="frozen", frozen_epochs=1, lr=1e-6, quantize_int8=False, batch_size=16, threads=2,
                       pretext_steps=0)
    result = train_version(labelled, spec, registry, weak)
    assert not result.became_current and registry.current_name() == before
    promotion = result.card.promotion
    assert promotion.compared_with == before and promotion.new_mean_auroc < promotion.current_mean_auroc
    assert "candidate only" in promotion.reason and result.card.parent_version == before
    assert result.version.name in [v.name for v in registry.versions()]


def test_parity_failure_registers_nothing(tmp_path, training_export, data_root, spec):
    registry = Registry(tmp_path / "models")
    labelled = labelled_set_from_export(training_export, spec, data_root)
    config = TrainConfig(mode="frozen", frozen_epochs=1, lr=1e-3, quantize_int8=False, batch_size=16, threads=2,
                         parity_tolerance=0.0, pretext_steps=0)  # no export is bit-exact: the check must refuse
    with pytest.raises(ParityError, match="differ from torch by up to"):
        train_version(labelled, spec, registry, config)
    assert registry.versions() == [] and registry.current_name() is None
    assert not list((tmp_path / "models").glob(".staging-*"))
