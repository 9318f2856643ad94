"""A DICOM folder is flagged through the importer's own normalization: same flags as its imported DATA_DIR."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger_cohorts import read_csv
from mammoflag.registry import resolve_model


def _root_conftest():
    """The session-wide tests/conftest.py (its constants: the shared cohort's secret and display size)."""
    spec = importlib.util.spec_from_file_location("root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dicom_folder_equals_its_import(synthetic_cohort, imported_cohort, tiny_registry, tmp_path, caplog):
    dicom_dir, ground_truth = synthetic_cohort
    shared = _root_conftest()
    version = resolve_model(tiny_registry)
    from_import = FlagOutputs(tmp_path / "import" / "flags.csv", images=tmp_path / "import" / "images.csv")
    from_dicom = FlagOutputs(tmp_path / "dicom" / "flags.csv", images=tmp_path / "dicom" / "images.csv")
    flag_cohort(imported_cohort, version, from_import, options=FlagOptions(workers=0, progress=False))
    with caplog.at_level(logging.DEBUG):
        summary = flag_cohort(dicom_dir, version, from_dicom, patient_key_secret=shared.TEST_PATIENT_KEY_SECRET,
                              options=FlagOptions(workers=1, batch_size=8, progress=False,
                                                  display_long_side=shared.COHORT_LONG_SIDE))

    # the display images are the importer's either way, so every study and image agrees exactly
    assert read_csv(from_dicom.flags) == read_csv(from_import.flags)
    dicom_images, import_images = read_csv(from_dicom.images), read_csv(from_import.images)
    assert dicom_images == import_images
    assert {r["key"] for r in dicom_images} == {f"{g['sop_instance_uid']}:{g['frame']}" for g in ground_truth}
    assert any(r["frame"] == "1" for r in dicom_images)  # the multi-frame file: one row per frame
    assert summary.studies == len({g["study_instance_uid"] for g in ground_truth})
    # header hints: a magnification view modifier is reported, and only on true mag views
    truth = {f"{g['sop_instance_uid']}:{g['frame']}": g for g in ground_truth}
    hinted = [r for r in dicom_images if r["header_mag_view"] == "1"]
    assert hinted and all(truth[r["key"]]["mag_view"] == "1" for r in hinted)

    # every input file is accounted for: the only non-image in the folder is reported as skipped
    errors = read_csv(from_dicom.errors_path)
    assert [(e["path"], e["status"]) for e in errors] == [("ground_truth.csv", "skipped")]
    # no patient identifiers or file paths in the logs or outputs
    texts = [caplog.text, from_dicom.flags.read_text(), from_dicom.images.read_text(), json.dumps(errors)]
    assert not any(str(dicom_dir) in t for t in texts)
    assert not any(marker in t for t in texts for marker in ("FAKE", "PID", "ACC"))
