"""A DICOM folder is flagged through the importer's own normalization: same flags as its imported DATA_DIR."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger_cohorts import read_csv
from mammoflag.registry import resolve_model
from shared_cohort import COHORT_LONG_SIDE, TEST_PATIENT_KEY_SECRET


def test_dicom_folder_equals_its_import(synthetic_cohort, imported_cohort, tiny_registry, tmp_path, caplog):
    dicom_dir, ground_truth = synthetic_cohort
    version = resolve_model(tiny_registry)
    from_import = FlagOutputs(tmp_path / "import" / "flags.csv", images=tmp_path / "import" / "images.csv")
    from_dicom = FlagOutputs(tmp_path / "dicom" / "flags.csv", images=tmp_path / "dicom" / "images.csv")
    flag_cohort(imported_cohort, version, from_import, options=FlagOptions(workers=0, progress=False))
    with caplog.at_level(logging.DEBUG):
        summary = flag_cohort(dicom_dir, version, from_dicom, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                              options=FlagOptions(workers=1, batch_size=8, progress=False,
                                                  display_long_side=COHORT_LONG_SIDE))

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


def _decode_processes() -> list[int]:
    """This process's multiprocessing children that run work (not the resource tracker), from /proc."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        if ppid == me and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_decode_process_loses_nothing(synthetic_cohort, tiny_registry, tmp_path, caplog):
    """SIGKILL a decode process mid-run (as a native decoder crash would): the units it held are
    retried one by one, and the outputs equal an undisturbed run's."""
    dicom_dir, _ = synthetic_cohort
    version = resolve_model(tiny_registry)
    options = FlagOptions(batch_size=8, progress=False, display_long_side=COHORT_LONG_SIDE)
    clean = FlagOutputs(tmp_path / "clean" / "flags.csv", images=tmp_path / "clean" / "images.csv")
    undisturbed = flag_cohort(dicom_dir, version, clean, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                              options=dataclasses.replace(options, workers=0))

    killed: list[int] = []
    stop = threading.Event()

    def kill_first_decoder() -> None:
        while not stop.is_set() and not killed:
            for pid in _decode_processes():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_decoder, daemon=True)
    killer.start()
    crashed = FlagOutputs(tmp_path / "crashed" / "flags.csv", images=tmp_path / "crashed" / "images.csv")
    try:
        with caplog.at_level(logging.WARNING, logger="flagger.pipeline"):
            summary = flag_cohort(dicom_dir, version, crashed, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                                  options=dataclasses.replace(options, workers=1))
    finally:
        stop.set()
        killer.join()

    assert killed, "no decode process was seen"
    assert "a decode process died" in caplog.text  # the recovery path ran
    assert summary.problems == undisturbed.problems  # the cohort's own unreadable files, nothing more
    assert read_csv(crashed.errors_path) == read_csv(clean.errors_path)
    assert read_csv(crashed.flags) == read_csv(clean.flags)
    assert read_csv(crashed.images) == read_csv(clean.images)
