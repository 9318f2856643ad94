"""The synthetic cohort: deterministic, every header convention the importer must handle, learnable labels."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from importers.synthetic import (BASE_GROUND_TRUTH_COLUMNS, DIFFICULTY_COLUMNS, DISTRACTORS, FAMILIES,
                                 GROUND_TRUTH_COLUMNS, MG_FOR_PROCESSING, STANDARD, ImagePlan, read_ground_truth,
                                 read_marker_boxes, render_image, write_synthetic_cohort)
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


# --- the hard families (standard, shifted): small, faint, cut markers among look-alikes


def test_families_are_named_and_differ():
    assert {"classic", "standard", "shifted"} <= set(FAMILIES)
    standard, shifted = FAMILIES["standard"], FAMILIES["shifted"]
    assert standard != shifted
    differing = [f.name for f in dataclasses.fields(standard)
                 if getattr(standard, f.name) != getattr(shifted, f.name)]
    # generator shift: not just a name, but marker, tissue, artefact and vendor distributions
    assert {"marker_shapes", "marker_size", "metal_rate", "placement", "distractor_rates", "vendors",
            "noise_sigma", "gamma", "mag_paddle"} <= set(differing)
    for family in (standard, shifted):
        assert family.marker_size[0] <= 0.01  # ~1 % of the long side or less
        assert len(dict(family.marker_shapes)) >= 8
    with pytest.raises(ValueError):
        write_synthetic_cohort("unused", 1, family="no-such-family")


def test_hard_family_deterministic_and_distinct(tmp_path):
    kwargs = dict(size=96, images_per_study=(2, 3), compressions=["none"])
    a = write_synthetic_cohort(tmp_path / "a", 3, seed=5, family="standard", **kwargs)
    b = write_synthetic_cohort(tmp_path / "b", 3, seed=5, family="standard", **kwargs)
    c = write_synthetic_cohort(tmp_path / "c", 3, seed=5, family="shifted", **kwargs)
    assert _tree_digest(a.parent) == _tree_digest(b.parent)
    digests_a, digests_c = _tree_digest(a.parent), _tree_digest(c.parent)
    assert not set(digests_a.values()) & set(digests_c.values())  # same seed, other family: other files
    assert {r["family"] for r in read_ground_truth(c)} == {"shifted"}


@pytest.fixture(scope="module")
def standard_cohort(tmp_path_factory):
    dicom_dir = tmp_path_factory.mktemp("standard-cohort")
    gt = write_synthetic_cohort(dicom_dir, 8, seed=3, size=160, family="standard", biopsy_rate=0.6, mag_rate=0.5)
    return dicom_dir, read_ground_truth(gt)


def test_ground_truth_keeps_base_columns_first_and_adds_difficulty(standard_cohort):
    dicom_dir, rows = standard_cohort
    with open(dicom_dir / "ground_truth.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:len(BASE_GROUND_TRUTH_COLUMNS)] == BASE_GROUND_TRUTH_COLUMNS
    assert header == GROUND_TRUTH_COLUMNS == BASE_GROUND_TRUTH_COLUMNS + DIFFICULTY_COLUMNS
    positives = [r for r in rows if r["biopsy_tool"] == "1"]
    negatives = [r for r in rows if r["biopsy_tool"] == "0"]
    assert positives and negatives and {r["mag_view"] for r in rows} == {"0", "1"}
    for r in positives:  # a positive shows marker pixels; its attributes are filled in
        assert int(r["marker_visible_px"]) > 0 and int(r["marker_count"]) == len(r["marker_shapes"].split(";"))
        assert 0 < float(r["marker_size_frac"]) and float(r["marker_contrast"]) > 0
        assert r["marker_cut_by_edge"] in ("0", "1") and r["marker_metal"] in ("0", "1")
        rows_, cols_ = (int(v) for v in r["detector"].split("x"))
        boxes = read_marker_boxes(r["marker_boxes"])
        assert boxes and all(0 <= r0 < r1 <= rows_ and 0 <= c0 < c1 <= cols_ for r0, c0, r1, c1 in boxes)
        assert sum((r1 - r0) * (c1 - c0) for r0, c0, r1, c1 in boxes) >= int(r["marker_visible_px"])
    for r in negatives:
        assert r["marker_visible_px"] == "0" and r["marker_count"] == "0" and r["marker_shapes"] == ""
        assert r["marker_boxes"] == ""
    assert any(r["distractors"] for r in negatives), "negatives carry look-alikes too"
    assert {r["vendor"] for r in rows} == set(FAMILIES["standard"].vendors)
    assert all(r["detector"] == f"{ds.Rows}x{ds.Columns}" for r, ds in
               ((r, pydicom.dcmread(dicom_dir / r["file"], stop_before_pixels=True)) for r in rows[:4]))


def _render(params, tools=(), mag=False, view="CC", seed=0, rows=200, cols=160):
    plan = ImagePlan("L", view, mag, tuple(tools), "none", False)
    return render_image(np.random.default_rng(seed), rows, cols, plan, params)


def test_cut_marker_is_partly_visible_on_the_border():
    edge_only = dataclasses.replace(STANDARD, placement=(("edge", 1.0),), edge_offset=(-0.45, -0.2))
    cut = []
    for seed in range(12):
        drawn = _render(edge_only, tools=("ring",), seed=seed)
        assert drawn.marker.any() and drawn.attributes["marker_visible_px"] == int(drawn.marker.sum())
        if drawn.attributes["marker_cut_by_edge"]:
            cut.append(drawn)
            border = np.concatenate([drawn.marker[0], drawn.marker[-1], drawn.marker[:, 0], drawn.marker[:, -1]])
            assert border.any(), "a cut marker reaches the image border"
    assert len(cut) >= 6


def test_small_faint_markers_are_small_and_faint():
    faint_small = dataclasses.replace(STANDARD, marker_size=(0.01, 0.01), metal_rate=0.0, faint_contrast=(0.05, 0.05),
                                      noise_sigma=(0.005, 0.005), marker_min_px=4.0)
    drawn = _render(faint_small, tools=("cross",), seed=1, rows=1024, cols=832)
    assert 0.005 < drawn.attributes["marker_size_frac"] < 0.02
    assert 0.02 < drawn.attributes["marker_contrast"] <= 0.051
    assert 0 < drawn.attributes["marker_visible_px"] < 200
    assert drawn.attributes["marker_metal"] == 0


def test_negatives_have_distractors_and_no_marker_pixels():
    everything = dataclasses.replace(STANDARD, distractor_rates=tuple((d, 1.0) for d in DISTRACTORS),
                                     text_saturated_rate=1.0)
    for mag in (False, True):
        drawn = _render(everything, mag=mag, seed=4)
        assert not drawn.marker.any() and drawn.attributes["marker_visible_px"] == 0
        assert set(drawn.attributes["distractors"].split(";")) == set(DISTRACTORS)
        assert drawn.burned_in
        assert drawn.intensity.max() >= 1.0, "burned-in text is as bright as metal: brightest is not 'marker'"


def test_hard_render_is_deterministic_per_seed():
    one, two = _render(STANDARD, tools=("coil", "bb"), seed=9), _render(STANDARD, tools=("coil", "bb"), seed=9)
    assert np.array_equal(one.intensity, two.intensity) and one.attributes == two.attributes
    assert not np.array_equal(one.intensity, _render(STANDARD, tools=("coil", "bb"), seed=10).intensity)


def test_every_marker_shape_draws_visible_pixels():
    for shape in dict(STANDARD.marker_shapes):
        drawn = _render(dataclasses.replace(STANDARD, placement=(("breast", 1.0),)), tools=(shape,), seed=2)
        assert drawn.attributes["marker_visible_px"] > 0, shape
        assert drawn.attributes["marker_size_frac"] > 0, shape


def test_new_vendor_conventions_import(tmp_path):
    """Planmed-like (MONOCHROME1 without Presentation LUT Shape, LINEAR_EXACT, padding at the top value) and
    IMS-like (10 bits, windows without VOI LUT Function, no magnification factor) files import, not inverted."""
    from importers.run import import_dicoms
    from mammoflag.dicom.types import NormalizeOptions

    dicom_dir = tmp_path / "dicom"
    gt = write_synthetic_cohort(dicom_dir, 2, seed=2, size=128, images_per_study=(2, 2), vendors=["planmed", "ims"],
                                family="standard", compressions=["none", "rle"], for_processing_every=0,
                                multiframe=False, mag_rate=0)
    rows = read_ground_truth(gt)
    headers = _headers(dicom_dir, rows)
    planmed = [ds for ds in headers.values() if ds.Manufacturer == "Planmed Oy"]
    ims = [ds for ds in headers.values() if ds.Manufacturer.startswith("I.M.S.")]
    assert planmed and ims
    assert all(ds.PhotometricInterpretation == "MONOCHROME1" and "PresentationLUTShape" not in ds
               and ds.VOILUTFunction == "LINEAR_EXACT" and ds.PixelPaddingValue == (1 << 14) - 1 for ds in planmed)
    assert all(ds.BitsStored == 10 and "VOILUTFunction" not in ds and ds.pixel_array.max() < 1024
               and "EstimatedRadiographicMagnificationFactor" not in ds for ds in ims)

    out = tmp_path / "data"
    summary = import_dicoms(dicom_dir, out, NormalizeOptions(long_side=128), "synthetic-test-secret",
                            data_root=tmp_path, workers=1, progress=False)
    assert summary.imported == len(headers) and summary.failed == 0
    truth = {f"{r['sop_instance_uid']}:{r['frame']}": r for r in rows}
    with open(out / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    assert {truth[m["key"]]["vendor"] for m in manifest} == {"planmed", "ims"}
    for m in manifest:
        display = load_display_image(out / m["image"]).astype(float)
        # Contact views: the chest wall (tissue) is at the image's left for L breasts, right for R; the
        # far side is air. A MONOCHROME1 file inverted twice (or not at all) would show white air.
        left, right = display[:, :3].mean(), display[:, -3:].mean()
        laterality = headers[truth[m["key"]]["file"]].ImageLaterality
        chest, far = (left, right) if laterality == "L" else (right, left)
        assert far < 60 < chest, (truth[m["key"]]["vendor"], chest, far)


def test_shifted_headers_slip_and_their_magnification_factors_overlap_less_kindly(tmp_path):
    """STANDARD writes the textbook header (1.8 on every mag view, 1.07 on contact views, a modifier code on
    every mag view of a coding vendor); SHIFTED draws factors from ranges and lets a share of mag views go
    uncoded, with a contact view's factor (importers/synthetic.py ``header_slip_rate``)."""
    kwargs = dict(size=96, images_per_study=(3, 4), compressions=["none"], vendors=["hologic", "siemens"],
                  mag_rate=0.9, multiframe=False)

    def views(family: str) -> list[tuple[bool, float, bool]]:
        out = tmp_path / family
        rows = read_ground_truth(write_synthetic_cohort(out, 12, seed=7, family=family, **kwargs))
        headers = _headers(out, rows)
        return [(r["mag_view"] == "1", float(headers[r["file"]].EstimatedRadiographicMagnificationFactor),
                 bool(headers[r["file"]].ViewCodeSequence[0].ViewModifierCodeSequence)) for r in rows]

    standard, shifted = views("standard"), views("shifted")
    assert {(mag, f, coded) for mag, f, coded in standard} <= {(True, 1.8, True), (False, 1.07, False)}
    mags = [(f, coded) for mag, f, coded in shifted if mag]
    assert any(not coded for _, coded in mags) and any(coded for _, coded in mags)
    assert all(1.3 <= f <= 2.0 for f, coded in mags if coded) and all(1.0 <= f <= 1.2 for f, coded in mags
                                                                     if not coded)
    assert all(1.0 <= f <= 1.2 and not coded for mag, f, coded in shifted if not mag)
