"""The synthetic cohort: deterministic, every header convention the importer must handle, learnable labels."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from importers.synthetic import (GROUND_TRUTH_COLUMNS, MG_FOR_PROCESSING, read_ground_truth,
                                 write_synthetic_cohort)
from mammoflag.preprocess import letterbox, load_display_image


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = write_synthetic_cohort(tmp_path / "a", 3, seed=5, size=96)
    b = write_synthetic_cohort(tmp_path / "b", 3, seed=5, size=96)
    c = write_synthetic_cohort(tmp_path / "c", 3, seed=6, size=96)
    assert _tree_digest(a.parent) == _tree_digest(b.parent)
    assert read_ground_truth(a) != read_ground_truth(c)


def _headers(dicom_dir: Path, rows: list[dict[str, str]]) -> dict[str, pydicom.Dataset]:
    return {f: pydicom.dcmread(dicom_dir / f) for f in sorted({r["file"] for r in rows})}


def test_cohort_covers_the_header_conventions(synthetic_cohort):
    dicom_dir, rows = synthetic_cohort
    assert list(rows[0]) == GROUND_TRUTH_COLUMNS
    headers = _headers(dicom_dir, rows)
    values = lambda keyword: Counter(str(ds.get(keyword, "")) for ds in headers.values())  # noqa: E731

    assert len(values("Manufacturer")) == 4
    assert {"MONOCHROME1", "MONOCHROME2"} <= set(values("PhotometricInterpretation"))
    assert any(ds.PhotometricInterpretation == "MONOCHROME1" and ds.PresentationLUTShape == "INVERSE"
               for ds in headers.values())
    assert {"12", "14", "16"} <= set(values("BitsStored"))
    assert {"LINEAR", "SIGMOID"} <= set(values("VOILUTFunction"))
    assert any("VOILUTSequence" in ds for ds in headers.values())
    assert any(ds.get("WindowCenter") is not None and isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
               for ds in headers.values()), "some file has several windows"
    assert any(float(ds.RescaleSlope) != 1 or float(ds.RescaleIntercept) != 0 for ds in headers.values())
    assert any("PixelPaddingValue" in ds for ds in headers.values())
    for_processing = [ds for ds in headers.values() if ds.SOPClassUID == MG_FOR_PROCESSING]
    assert for_processing and all("WindowCenter" not in ds and "VOILUTSequence" not in ds for ds in for_processing)
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in headers.values()}
    assert syntaxes >= {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80",
                        "1.2.840.10008.1.2.4.90"}
    assert any(int(ds.get("NumberOfFrames", 1)) > 1 for ds in headers.values())
    # the importer reads every file whatever its name
    assert any(not f.lower().endswith(".dcm") for f in headers)
    # fake identifiers are there to be leaked (and must not be)
    assert all(ds.PatientName and ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber
               for ds in headers.values())


def test_labels_both_ways_and_mag_codes_only_in_some_vendors(synthetic_cohort):
    dicom_dir, rows = synthetic_cohort
    assert Counter(r["biopsy_tool"] for r in rows).keys() == {"0", "1"}
    assert Counter(r["mag_view"] for r in rows).keys() == {"0", "1"}
    headers = _headers(dicom_dir, rows)
    coded = Counter()
    for r in rows:
        if r["mag_view"] == "1":
            ds = headers[r["file"]]
            modifiers = ds.ViewCodeSequence[0].ViewModifierCodeSequence
            coded[bool(modifiers)] += 1
    assert coded[True] and coded[False], "headers must be unreliable: some mag views carry no modifier code"
    # one row per frame, and every file of the ground truth exists
    frames = Counter(r["file"] for r in rows)
    for f, n in frames.items():
        assert int(headers[f].get("NumberOfFrames", 1)) == n


def test_pixels_decode_and_tools_are_the_brightest_thing(synthetic_cohort):
    dicom_dir, rows = synthetic_cohort
    # Through pydicom alone (not our importer): every file decodes to its declared size.
    for f, ds in _headers(dicom_dir, rows).items():
        arr = ds.pixel_array
        assert arr.shape[-2:] == (ds.Rows, ds.Columns)
        assert arr.max() < (1 << ds.BitsStored)


def test_labels_survive_the_importer_at_small_sizes(imported_cohort, synthetic_cohort):
    """Learnability check: at 128 px, saturated metal separates biopsy images from the rest, and
    air (dark background) separates contact views from magnification views, for most images."""
    import csv

    _, rows = synthetic_cohort
    truth = {f"{r['sop_instance_uid']}:{r['frame']}": r for r in rows}
    metal, air = [], []
    with open(imported_cohort / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            display = load_display_image(imported_cohort / row["image"])
            small = letterbox(display, 128)
            t = truth[row["key"]]
            h, w = display.shape
            metal.append((int(t["biopsy_tool"]), int((small >= 235).sum())))
            air.append((int(t["mag_view"]), float((display < 20).mean())))
    assert len(metal) == len(rows)

    def accuracy(pairs, threshold, positive_above):
        return np.mean([(score > threshold) == bool(label) if positive_above else (score < threshold) == bool(label)
                        for label, score in pairs])

    assert accuracy(metal, 2, True) >= 0.8
    assert accuracy(air, 0.08, False) >= 0.85


@pytest.mark.parametrize("size", [None])
def test_realistic_default_sizes(tmp_path, size):
    gt = write_synthetic_cohort(tmp_path, 1, seed=1, size=size, images_per_study=(1, 1), compressions=["none"],
                                multiframe=False)
    ds = pydicom.dcmread(tmp_path / read_ground_truth(gt)[0]["file"], stop_before_pixels=True)
    assert max(ds.Rows, ds.Columns) >= 2000
