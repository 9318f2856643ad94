"""The per-file DICOM core: display chain, fast path vs the float64 reference, bad input, header hints.

Synthetic images are built here with pydicom (small, mammography-like: a bright breast on a
dark background, 12 bits stored in 16, a metal-bright marker), so each test controls exactly
one header feature. The last tests run the core over every file in pydicom's test data.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from mammoflag.dicom.normalize import area_resize, area_resize_u8, display_size, load_display_frames
from mammoflag.dicom.headers import header_hints, patient_key
from mammoflag.dicom.types import FailFile, NormalizeOptions, SkipFile

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
PATIENT_NAME, PATIENT_ID, ACCESSION = "DOE^JANE", "PID-998877", "ACC-12345"
SECRET = "test-patient-key-secret"

SMALL = NormalizeOptions(long_side=64)
SMALL_EXACT = NormalizeOptions(long_side=64, exact=True)


# ---------------------------------------------------------------------------------------
# Synthetic mammography-like DICOMs
# ---------------------------------------------------------------------------------------


def breast_phantom(rows: int = 256, cols: int = 208, bits: int = 12, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Stored values: dark air, a half-ellipse of textured tissue on the left, a bright clip."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    y, x = np.mgrid[0:rows, 0:cols]
    inside = ((y - rows / 2) / (rows * 0.45)) ** 2 + (x / (cols * 0.8)) ** 2 < 1
    tissue = 0.45 + 0.25 * np.sin(y / 7.0) * np.cos(x / 11.0) + noise * rng.standard_normal((rows, cols))
    img = np.where(inside, tissue * top, 0.04 * top + 0.01 * top * rng.standard_normal((rows, cols)))
    clip = (y - rows * 0.4) ** 2 + (x - cols * 0.3) ** 2 < (rows / 40) ** 2  # a biopsy marker: near-max
    img[clip] = 0.97 * top
    return np.clip(np.rint(img), 0, top).astype(np.uint16)


def mammo_dataset(pixels: np.ndarray | None = None, *, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                  frames: int = 1, signed: bool = False, **elements) -> Dataset:
    """A minimal Digital Mammography For Presentation dataset around ``pixels`` (stored values)."""
    if pixels is None:
        pixels = breast_phantom(bits=bits_stored)
    if frames > 1 and pixels.ndim == 2:
        pixels = np.stack([np.roll(pixels, 9 * i, axis=1) for i in range(frames)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MG"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19600101"
    ds.AccessionNumber = ACCESSION
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "HOLOGIC, Inc."
    ds.ManufacturerModelName = "Selenia Dimensions"
    ds.ViewPosition = "CC"
    ds.ImageLaterality = "L"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16 if pixels.dtype.itemsize == 2 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.WindowCenter = 2048
    ds.WindowWidth = 3000
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword) if keyword in ds else None
        else:
            setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def grey_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


def single(path: Path, options: NormalizeOptions = SMALL) -> np.ndarray:
    images = load_display_frames(path, options, SECRET)
    assert len(images.frames) == 1
    return images.frames[0].pixels


def voi_lut_item(first: int, entries: int, bits: int = 16, gamma: float = 0.7) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits]
    ramp = (np.linspace(0, 1, entries) ** gamma * 4095).astype(np.uint16)  # 12-bit data, 16 declared
    item.LUTData = ramp.tolist()
    item["LUTData"].VR = "US"
    item.LUTExplanation = "GAMMA"
    return item


# Each case: a header feature the chain must get right; exact and fast must agree on all.
CASES: dict[str, dict] = {
    "linear": {},
    "linear_exact": {"VOILUTFunction": "LINEAR_EXACT", "WindowCenter": 1800, "WindowWidth": 1200},
    "sigmoid": {"VOILUTFunction": "SIGMOID", "WindowCenter": 1900, "WindowWidth": 900},
    "narrow_window": {"WindowCenter": 1850, "WindowWidth": 40},
    "monochrome1": {"photometric": "MONOCHROME1"},
    "inverse_shape": {"PresentationLUTShape": "INVERSE"},
    "rescale": {"RescaleSlope": 0.5, "RescaleIntercept": 100, "WindowCenter": 1100, "WindowWidth": 1600},
    "voi_lut": {"VOILUTSequence": "lut", "WindowCenter": None, "WindowWidth": None},
    "for_processing": {"PresentationIntentType": "FOR PROCESSING", "SOPClassUID": MG_FOR_PROCESSING,
                       "WindowCenter": None, "WindowWidth": None},
    "padding": {"PixelPaddingValue": 0, "PixelPaddingRangeLimit": 200},
    "odd_size": {"pixels": breast_phantom(231, 197)},
    "bits16": {"bits_stored": 16, "pixels": breast_phantom(bits=16), "WindowCenter": 30000, "WindowWidth": 50000},
    "bits8": {"bits_stored": 8, "pixels": breast_phantom(bits=8).astype(np.uint8), "WindowCenter": 128,
              "WindowWidth": 200},
}


def case_dataset(name: str) -> Dataset:
    spec = dict(CASES[name])
    if spec.get("VOILUTSequence") == "lut":
        spec["VOILUTSequence"] = Sequence([voi_lut_item(first=0, entries=4096)])
    return mammo_dataset(**spec)


# ---------------------------------------------------------------------------------------
# The chain, fast vs exact
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_matches_the_exact_chain(tmp_path, case):
    path = write(case_dataset(case), tmp_path / f"{case}.dcm")
    exact, fast = single(path, SMALL_EXACT), single(path, SMALL)
    assert exact.shape == fast.shape
    mean, worst = grey_diff(exact, fast)
    assert mean <= 0.5 and worst <= 3, (case, mean, worst)
    assert exact.std() > 10, "the test image should show contrast"


def test_display_size_keeps_aspect_and_never_upscales(tmp_path):
    assert display_size(4096, 3328, 1024) == (1024, 832)
    assert display_size(3328, 4096, 1024) == (832, 1024)
    assert display_size(2294, 1914, 1024) == (1024, 854)
    assert display_size(300, 200, 1024) == (300, 200)
    path = write(mammo_dataset(breast_phantom(231, 197)), tmp_path / "a.dcm")
    assert single(path).shape == (64, 55)
    assert single(path, NormalizeOptions(long_side=1024)).shape == (231, 197)


@pytest.mark.parametrize("shape", [(2850, 2294), (3328, 4096), (1000, 777), (300, 97)])
def test_fast_u8_area_resize_is_the_reference_rounded(shape):
    rng = np.random.default_rng(shape[0])
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img[:, -3:] = 255  # a sharp edge at the border: where a whole-pixel box filter would be off
    size = display_size(*shape, 256)
    fast = area_resize_u8(img, size)
    assert fast.shape == size and fast.dtype == np.uint8
    assert np.abs(fast - area_resize(img, size)).max() <= 0.501  # rounding, plus float32 accumulation


@pytest.mark.parametrize("shape, size", [
    ((4096, 3328), (1024, 832)), ((1024, 768), (128, 96)), ((512, 416), (32, 26)),  # 1/4, 1/8, 1/16
    ((600, 1000), (150, 250)), ((96, 1000), (24, 250)),  # the last band shorter, one band only
    ((1000, 800), (500, 400)), ((1024, 768), (256, 96)), ((1001, 800), (250, 200)), ((2850, 2294), (1024, 824)),
])
def test_banded_table_and_resize_is_exactly_the_two_steps(shape, size):
    """The 16-bit 2x2 steps (exact 1/4, 1/8, 1/16) give the pixels of apply_table + OpenCV's INTER_AREA.

    Adversarial inputs: random tables (any grey for any word), words in the whole 16-bit range,
    block sums that are exact halves (ties round to even), and all-white blocks (the largest sums).
    Other sizes (2x, non-integer) take the two steps as they are.
    """
    from mammoflag.dicom.display import apply_table
    from mammoflag.dicom.render import table_then_area_resize

    rng = np.random.default_rng(shape[0] + size[0])
    for bits in (16, 8):
        words = rng.integers(0, 1 << bits, shape).astype(np.uint16 if bits == 16 else np.uint8)
        for table in (rng.integers(0, 256, 1 << bits).astype(np.uint8),
                      (rng.integers(0, 2, 1 << bits) * 255).astype(np.uint8),  # half-white blocks: a tie
                      np.full(1 << bits, 255, np.uint8),
                      np.arange(1 << bits, dtype=np.uint32).astype(np.uint8)):
            expected = area_resize_u8(apply_table(words, table), size)
            assert np.array_equal(table_then_area_resize(words, table, size), expected)
    # ties: every 4x4 block sums to 16 * n + 8, which rounds to the even neighbour
    ties = np.tile(np.array([[9, 9, 8, 8]] * 4, dtype=np.uint8), (8, 8))
    ties -= np.arange(8, dtype=np.uint8).repeat(4)[:, None]  # block rows n = 0..7: sums 16 * (8 - n) + 8
    assert (ties.reshape(8, 4, 8, 4).sum(axis=(1, 3)) % 16 == 8).all()
    words = np.arange(ties.size, dtype=np.uint16).reshape(ties.shape)
    table = np.zeros(1 << 16, np.uint8)
    table[words.ravel()] = ties.ravel()
    assert np.array_equal(table_then_area_resize(words, table, (8, 8)), area_resize_u8(ties, (8, 8)))


def test_area_resize_is_a_true_area_average():
    """Non-integer factors weigh partial pixels by the area they cover (Pillow's BOX does not)."""
    img = np.random.default_rng(1).uniform(0, 255, (6, 9))
    # reference: split every pixel into 2x2 equal parts, then average 3x3 blocks -> factor 1.5
    reference = np.kron(img, np.ones((2, 2))).reshape(4, 3, 6, 3).mean(axis=(1, 3))
    assert np.allclose(area_resize(img, (4, 6)), reference)
    # integer factors are block means; uint8 input works the same
    u8 = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.allclose(area_resize(u8, (2, 2)), u8.reshape(2, 4, 2, 4).mean(axis=(1, 3)))


def _pydicom_reference(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """pydicom's own modality + VOI at full size, scaled by apply_windowing's output range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = apply_voi_lut(apply_modality_lut(stored, ds), ds)
    lo = 0.0 * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    hi = (2**ds.BitsStored - 1) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    return np.rint((out - lo) / (hi - lo) * 255)


@pytest.mark.parametrize("case", ["linear", "linear_exact", "sigmoid", "narrow_window", "rescale"])
def test_windowing_agrees_with_pydicom_apply_windowing(tmp_path, case):
    ds = case_dataset(case)
    path = write(ds, tmp_path / "w.dcm")
    full = NormalizeOptions(long_side=4096, exact=True)
    ours = single(path, full).astype(np.float64)
    stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    reference = _pydicom_reference(ds, stored)
    assert np.abs(ours - reference).max() <= 1


def test_window_index_picks_the_window(tmp_path):
    ds = mammo_dataset(WindowCenter=[2048, 1000], WindowWidth=[3000, 400])
    path = write(ds, tmp_path / "two_windows.dcm")
    first = single(path)
    second = single(path, NormalizeOptions(long_side=64, window_index=1))
    only_second = single(write(mammo_dataset(WindowCenter=1000, WindowWidth=400), tmp_path / "w2.dcm"))
    assert grey_diff(first, second)[0] > 10
    assert np.array_equal(second, only_second)
    images = load_display_frames(path, NormalizeOptions(long_side=64, window_index=5))
    assert np.array_equal(images.frames[0].pixels, first)
    assert any("window-index:5" in n for n in images.notes)


def test_voi_hint_names_the_voi_used(tmp_path):
    expected = {"linear": "window:LINEAR", "linear_exact": "window:LINEAR_EXACT", "sigmoid": "window:SIGMOID",
                "voi_lut": "lut", "for_processing": "fallback:for-processing"}
    for case, voi in expected.items():
        images = load_display_frames(write(case_dataset(case), tmp_path / f"{case}.dcm"), SMALL)
        assert images.hints.voi == voi
    fallback = load_display_frames(tmp_path / "for_processing.dcm", SMALL)
    assert "fallback:for-processing" in fallback.notes
    # the fallback window still shows the breast: percentiles, not a flat or saturated image
    assert 20 < fallback.frames[0].pixels.mean() < 235 and fallback.frames[0].pixels.std() > 20


def test_sigmoid_differs_from_linear(tmp_path):
    linear = single(write(mammo_dataset(WindowCenter=1900, WindowWidth=900), tmp_path / "l.dcm"))
    sigmoid = single(write(mammo_dataset(WindowCenter=1900, WindowWidth=900, VOILUTFunction="SIGMOID"),
                           tmp_path / "s.dcm"))
    assert grey_diff(linear, sigmoid)[1] > 10


def test_voi_lut_is_applied_not_the_window(tmp_path):
    lut = Sequence([voi_lut_item(first=0, entries=4096, gamma=0.3)])
    with_lut = single(write(mammo_dataset(VOILUTSequence=lut), tmp_path / "lut.dcm"))
    window_only = single(write(mammo_dataset(), tmp_path / "win.dcm"))
    assert grey_diff(with_lut, window_only)[0] > 5
    # a LUT declared 16-bit holding 12-bit entries still reaches white
    assert with_lut.max() >= 240


# ---------------------------------------------------------------------------------------
# Polarity, padding, bits
# ---------------------------------------------------------------------------------------


def test_monochrome1_and_inverse_invert_exactly_once(tmp_path):
    def render(**kw):
        return single(write(mammo_dataset(**kw), tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm"),
                      SMALL_EXACT)

    normal = render()
    mono1 = render(photometric="MONOCHROME1")
    inverse = render(PresentationLUTShape="INVERSE")
    both = render(photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
    identity = render(PresentationLUTShape="IDENTITY")
    assert np.abs(mono1.astype(int) - (255 - normal.astype(int))).max() <= 1
    assert np.array_equal(mono1, inverse)
    assert np.array_equal(mono1, both), "MONOCHROME1 with INVERSE must not be inverted twice"
    assert np.array_equal(normal, identity)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("pad_value", [0, 4095])  # one of the two would show white unmasked
@pytest.mark.parametrize("exact", [False, True])
def test_padding_is_black_in_both_polarities(tmp_path, photometric, pad_value, exact):
    pixels = breast_phantom(256, 208)
    pixels[:, 160:] = pad_value  # right-hand 48 columns: outside the detector area
    ds = mammo_dataset(pixels, photometric=photometric, PixelPaddingValue=pad_value)
    out = single(write(ds, tmp_path / "pad.dcm"), NormalizeOptions(long_side=64, exact=exact))
    assert out[:, 40:].max() == 0  # 160/4 = 40: the padded blocks
    assert out[:, :39].max() > 100


def test_padding_range_limit_masks_the_whole_range(tmp_path):
    pixels = breast_phantom()
    pixels[:, 160:] = np.linspace(3900, 4095, 48).astype(np.uint16)  # vendor padding band, white unmasked
    ds = mammo_dataset(pixels, PixelPaddingValue=4095, PixelPaddingRangeLimit=3900)
    out = single(write(ds, tmp_path / "pad.dcm"))
    assert out[:, 40:].max() == 0


def test_signed_padding_written_as_unsigned_still_masks(tmp_path):
    # -2000 in 16 bits is 63536: a padding value written with VR US for signed data
    pixels = breast_phantom().astype(np.int16) - 2048
    pixels[:, 160:] = -2000
    ds = mammo_dataset(pixels.view(np.uint16), signed=True, WindowCenter=0, WindowWidth=3000,
                       photometric="MONOCHROME1")  # -2000 would be near white unmasked
    ds.PixelPaddingValue = 63536
    ds["PixelPaddingValue"].VR = "US"
    out = single(write(ds, tmp_path / "pad.dcm"))
    assert out[:, 40:].max() == 0


def test_bits_above_bits_stored_are_ignored(tmp_path):
    clean = breast_phantom()
    dirty = clean | np.uint16(0xA000)  # overlay bits 13 and 15 set in every pixel
    a = single(write(mammo_dataset(clean), tmp_path / "clean.dcm"))
    b = single(write(mammo_dataset(dirty), tmp_path / "dirty.dcm"))
    b_exact = single(tmp_path / "dirty.dcm", SMALL_EXACT)
    assert np.array_equal(a, b)
    assert grey_diff(a, b_exact)[1] <= 3


def test_signed_12_bit_data_is_sign_extended(tmp_path):
    values = breast_phantom().astype(np.int32) - 2048  # -2048..2047
    words = (values & 0x0FFF).astype(np.uint16)  # 12-bit two's complement, top 4 bits clear
    ds = mammo_dataset(words, signed=True, WindowCenter=0, WindowWidth=4000)
    out = single(write(ds, tmp_path / "signed.dcm"))
    out_exact = single(tmp_path / "signed.dcm", SMALL_EXACT)
    # the same image stored unsigned (values + 2048) with the window shifted by 2048
    reference = single(write(mammo_dataset(breast_phantom(), WindowCenter=2048, WindowWidth=4000),
                             tmp_path / "unsigned.dcm"))
    assert grey_diff(out, reference)[1] <= 1
    assert grey_diff(out_exact, reference)[1] <= 1


def test_multi_frame_gives_one_display_per_frame(tmp_path):
    path = write(mammo_dataset(frames=3), tmp_path / "mf.dcm")
    for options in (SMALL, SMALL_EXACT):
        images = load_display_frames(path, options)
        assert [f.frame for f in images.frames] == [0, 1, 2]
        assert images.hints.number_of_frames == 3
        assert grey_diff(images.frames[0].pixels, images.frames[2].pixels)[0] > 1


def test_enhanced_multi_frame_reads_window_and_rescale_from_functional_groups(tmp_path):
    """Breast tomosynthesis / Enhanced MG: the chain lives in shared and per-frame functional groups."""
    def group(**values) -> Dataset:
        item, macro = Dataset(), Dataset()
        for keyword, value in values.items():
            setattr(macro, keyword, value)
        sequence = "FrameVOILUTSequence" if "WindowCenter" in values else "PixelValueTransformationSequence"
        setattr(item, sequence, Sequence([macro]))
        return item

    ds = mammo_dataset(frames=3, WindowCenter=None, WindowWidth=None)
    shared = group(WindowCenter=2048, WindowWidth=3000)
    shared.PixelValueTransformationSequence = group(RescaleSlope=1, RescaleIntercept=0,
                                                    RescaleType="US").PixelValueTransformationSequence
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), group(WindowCenter=1000, WindowWidth=400), Dataset()])
    path = write(ds, tmp_path / "enhanced.dcm")
    images = load_display_frames(path, SMALL)
    assert images.hints.voi == "window:LINEAR"
    # frame 0 and 2 use the shared window; frame 1 its own narrower one
    same_anatomy = mammo_dataset(frames=3, WindowCenter=2048, WindowWidth=3000)
    plain = load_display_frames(write(same_anatomy, tmp_path / "plain.dcm"), SMALL)
    assert np.array_equal(images.frames[0].pixels, plain.frames[0].pixels)
    assert np.array_equal(images.frames[2].pixels, plain.frames[2].pixels)
    assert grey_diff(images.frames[1].pixels, plain.frames[1].pixels)[0] > 10
    exact = load_display_frames(path, SMALL_EXACT)
    for f, e in zip(images.frames, exact.frames):
        assert grey_diff(f.pixels, e.pixels)[1] <= 1


# ---------------------------------------------------------------------------------------
# Compressed transfer syntaxes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_files_decode_to_the_same_display(tmp_path, syntax):
    ds = mammo_dataset()
    half = NormalizeOptions(long_side=128)  # 2x: no JPEG 2000 reduced decoding (see below)
    plain = single(write(ds, tmp_path / "plain.dcm"), half)
    ds.compress(syntax)
    path = write(ds, tmp_path / "compressed.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    images = load_display_frames(path, half)
    assert np.array_equal(plain, images.frames[0].pixels)


@pytest.mark.parametrize("shape, long_side", [((512, 416), 64), ((512, 416), 50), ((700, 555), 128)])
def test_j2k_reduced_resolution_matches_full_decode(tmp_path, shape, long_side):
    """Decoding fewer wavelet levels is resize-first: close to the exact chain, not identical.

    Measured on this phantom (noisy texture, a saturated marker): mean ~1-1.8 grey levels,
    up to ~45 on single pixels at the marker's edge, where the window saturates. Without the
    grid alignment in ``_resize_reduced`` the mean error is ~10.
    """
    ds = mammo_dataset(breast_phantom(*shape), WindowCenter=1900, WindowWidth=1400)
    ds.compress(JPEG2000Lossless)
    path = write(ds, tmp_path / "j2k.dcm")
    reduced = load_display_frames(path, NormalizeOptions(long_side=long_side))
    full = load_display_frames(path, NormalizeOptions(long_side=long_side, exact=True))
    assert "j2k:reduced" in reduced.notes and "j2k:reduced" not in full.notes
    mean, worst = grey_diff(reduced.frames[0].pixels, full.frames[0].pixels)
    assert mean <= 2.0 and worst <= 64, (mean, worst)
    # within 2x of the display size: decoded at full resolution, exactly the chain
    whole = load_display_frames(path, NormalizeOptions(long_side=shape[0] // 2 + 1))
    assert "j2k:reduced" not in whole.notes


@pytest.mark.parametrize("name", ["RG3_J2KR.dcm", "RG3_J2KI.dcm", "RG1_J2KI.dcm"])
def test_j2k_reduced_resolution_on_real_radiographs(name):
    """pydicom-data's MONOCHROME1 CR radiographs, lossless and lossy J2K: reduced vs full decode."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    reduced = load_display_frames(path, NormalizeOptions(long_side=256))
    full = load_display_frames(path, NormalizeOptions(long_side=256, exact=True))
    assert "j2k:reduced" in reduced.notes
    mean, worst = grey_diff(reduced.frames[0].pixels, full.frames[0].pixels)
    assert mean <= 0.5 and worst <= 10, (mean, worst)


def test_j2k_without_a_header_window_decodes_at_full_resolution(tmp_path):
    """The fallback window is measured on full-resolution pixels in both paths, so they agree."""
    ds = case_dataset("for_processing")
    ds.compress(JPEG2000Lossless)
    path = write(ds, tmp_path / "j2k_for_processing.dcm")
    fast, exact = load_display_frames(path, SMALL), load_display_frames(path, SMALL_EXACT)
    assert "j2k:reduced" not in fast.notes and "fallback:for-processing" in fast.notes
    mean, worst = grey_diff(fast.frames[0].pixels, exact.frames[0].pixels)
    assert mean <= 0.5 and worst <= 3


# ---------------------------------------------------------------------------------------
# Bad input: skip or fail with a reason, never another exception, never an identifier
# ---------------------------------------------------------------------------------------


def assert_reason_is_clean(problem: SkipFile | FailFile, path: Path) -> None:
    assert problem.reason
    for secret in (PATIENT_NAME, "DOE", PATIENT_ID, ACCESSION, str(path), path.name, path.parent.name):
        assert secret not in problem.reason


@pytest.fixture
def identifying_dir(tmp_path) -> Path:
    """A folder named like a patient, as real archives sometimes are."""
    d = tmp_path / "DOE^JANE_PID-998877"
    d.mkdir()
    return d


def test_nothing_identifying_reaches_the_logs(identifying_dir, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    good = write(mammo_dataset(), identifying_dir / "good.dcm")
    load_display_frames(good, SMALL, SECRET)
    cut = identifying_dir / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-3000])
    with pytest.raises(FailFile):
        load_display_frames(cut, SMALL, SECRET)
    for identifier in (PATIENT_NAME, "DOE", PATIENT_ID, ACCESSION, "19600101", identifying_dir.name):
        assert identifier not in caplog.text


def test_not_dicom_is_skipped(identifying_dir):
    for name, content in {"notes.txt": b"hello " * 100, "empty.dcm": b"", "tiny.dcm": b"DI"}.items():
        path = identifying_dir / name
        path.write_bytes(content)
        with pytest.raises(SkipFile) as info:
            load_display_frames(path, SMALL)
        assert "not a DICOM file" in info.value.reason
        assert_reason_is_clean(info.value, path)


def test_truncated_pixel_data_fails(identifying_dir):
    path = write(mammo_dataset(), identifying_dir / "full.dcm")
    data = path.read_bytes()
    cut = identifying_dir / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    for options in (SMALL, SMALL_EXACT):
        with pytest.raises(FailFile) as info:
            load_display_frames(cut, options)
        assert "Pixel Data (7FE0,0010)" in info.value.reason and "truncated" in info.value.reason
        assert_reason_is_clean(info.value, cut)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_large_pixel_data_mapped_from_the_file_gives_the_same_display(tmp_path, monkeypatch, syntax):
    """Pixel Data above DEFER_READ_BYTES is mapped (uncompressed) or read when used (Deflated): same pixels,
    every frame at its offset, and a file cut short fails with the same reason as when read at once."""
    from mammoflag.dicom import normalize
    from mammoflag.dicom.decode import mapped_pixel_data

    ds = mammo_dataset(breast_phantom(1024, 832), frames=2)  # 3.4 MB of pixel data
    ds.file_meta.TransferSyntaxUID = syntax
    path = write(ds, tmp_path / "large.dcm")
    assert (mapped_pixel_data(normalize.read_dataset(path)) is not None) == (syntax != DeflatedExplicitVRLittleEndian)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-5000])
    outcomes = []
    for defer in (normalize.DEFER_READ_BYTES, None):  # None: the whole file read with the header
        monkeypatch.setattr(normalize, "DEFER_READ_BYTES", defer)
        images = load_display_frames(path, SMALL)
        with pytest.raises(FailFile) as info:
            load_display_frames(cut, SMALL)
        outcomes.append(([f.pixels for f in images.frames], info.value.reason))
    (mapped, mapped_reason), (read, read_reason) = outcomes
    assert len(mapped) == 2 and all(np.array_equal(a, b) for a, b in zip(mapped, read, strict=True))
    assert not np.array_equal(mapped[0], mapped[1])
    if syntax != DeflatedExplicitVRLittleEndian:  # a cut deflate stream fails earlier, on inflating
        assert mapped_reason == read_reason and "truncated" in mapped_reason


def test_truncated_compressed_pixel_data_fails(identifying_dir):
    ds = mammo_dataset()
    ds.compress(JPEGLSLossless)
    path = write(ds, identifying_dir / "jls.dcm")
    data = path.read_bytes()
    cut = identifying_dir / "jls_cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FailFile) as info:
        load_display_frames(cut, SMALL)
    assert_reason_is_clean(info.value, cut)


def test_colour_is_skipped(identifying_dir):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    ds = mammo_dataset(breast_phantom(32, 32, bits=8).astype(np.uint8), bits_stored=8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    path = write(ds, identifying_dir / "rgb.dcm")
    with pytest.raises(SkipFile) as info:
        load_display_frames(path, SMALL)
    assert "colour" in info.value.reason and "RGB" in info.value.reason
    assert_reason_is_clean(info.value, path)


def test_structured_report_is_skipped_naming_its_sop_class(identifying_dir):
    ds = mammo_dataset()
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    path = write(ds, identifying_dir / "sr.dcm")
    with pytest.raises(SkipFile) as info:
        load_display_frames(path, SMALL)
    assert "Pixel Data" in info.value.reason and "Enhanced SR" in info.value.reason


def _dataset_bytes(ds: Dataset, implicit_vr: bool) -> bytes:
    """The data set alone (no preamble, no File Meta), little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit_vr
    write_dataset(body, ds)
    return body.getvalue()


def _without_transfer_syntax(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` (explicit VR little endian) with a File Meta that lacks (0002,0010), as some exporters do."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    header = DicomBytesIO()
    write_file_meta_info(header, meta, enforce_standard=False)
    path.write_bytes(b"\0" * 128 + b"DICM" + header.getvalue() + _dataset_bytes(ds, implicit_vr=False))
    return path


def test_missing_transfer_syntax_native_is_read_as_guessed(tmp_path):
    ds = mammo_dataset()
    reference = single(write(ds, tmp_path / "ok.dcm"))
    path = _without_transfer_syntax(mammo_dataset(), tmp_path / "nots.dcm")
    assert "TransferSyntaxUID" not in pydicom.dcmread(path).file_meta
    images = load_display_frames(path, SMALL)
    assert any(n.startswith("transfer-syntax-missing") for n in images.notes)
    assert np.array_equal(images.frames[0].pixels, reference)


def test_missing_transfer_syntax_compressed_fails(tmp_path):
    ds = mammo_dataset()
    ds.compress(RLELossless)
    path = _without_transfer_syntax(ds, tmp_path / "nots_rle.dcm")
    with pytest.raises(FailFile) as info:
        load_display_frames(path, SMALL)
    assert "Transfer Syntax UID (0002,0010)" in info.value.reason


def test_headerless_dataset_is_read(tmp_path):
    """A bare dataset without preamble or File Meta (old exports): forced read, implicit VR guessed."""
    path = tmp_path / "bare.dcm"
    path.write_bytes(_dataset_bytes(mammo_dataset(), implicit_vr=True))
    images = load_display_frames(path, SMALL)
    assert images.frames[0].pixels.shape == (64, 52)


# ---------------------------------------------------------------------------------------
# Header hints
# ---------------------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_header_hints(tmp_path):
    view = _code("399162004", "SCT", "cranio-caudal")
    view.ViewModifierCodeSequence = Sequence([_code("399163009", "SCT", "magnification"),
                                              _code("R-102D7", "SRT", "spot compression")])
    ds = mammo_dataset(ViewCodeSequence=Sequence([view]), ImageType=["DERIVED", "PRIMARY", "POSTFIRE", "LEFT"],
                       ImageLaterality=None, Laterality="R", BurnedInAnnotation="YES")
    images = load_display_frames(write(ds, tmp_path / "h.dcm"), SMALL, SECRET)
    hints = images.hints
    assert hints.sop_instance_uid == ds.SOPInstanceUID
    assert hints.study_instance_uid == ds.StudyInstanceUID
    assert hints.series_instance_uid == ds.SeriesInstanceUID
    assert hints.view_modifiers == ("magnification", "spot_compression")
    assert hints.image_type == ("DERIVED", "PRIMARY", "POSTFIRE", "LEFT")
    assert hints.image_type_3 == "POSTFIRE"
    assert hints.laterality == "R"  # Image Laterality absent: series Laterality
    assert hints.view_position == "CC"
    assert hints.presentation_intent == "FOR PRESENTATION"
    assert (hints.manufacturer, hints.model) == ("HOLOGIC, Inc.", "Selenia Dimensions")
    assert hints.burned_in_annotation == "YES"
    assert (hints.rows, hints.cols, hints.number_of_frames) == (256, 208, 1)
    expected_key = hmac.new(SECRET.encode(), PATIENT_ID.encode(), hashlib.sha256).hexdigest()[:32]
    assert hints.patient_key == expected_key
    flat = repr(hints) + repr(images.notes)
    for identifier in (PATIENT_NAME, "DOE", PATIENT_ID, ACCESSION, "19600101"):
        assert identifier not in flat


def test_view_modifier_at_top_level_and_by_meaning():
    ds = Dataset()
    ds.ViewModifierCodeSequence = Sequence([_code("R-102D6", "SRT", "Magnification"),
                                            _code("X-1", "99LOCAL", "Spot Compression View")])
    assert header_hints(ds, None).view_modifiers == ("magnification", "spot_compression")


def test_patient_key_is_keyed():
    assert patient_key(PATIENT_ID, "a") != patient_key(PATIENT_ID, "b")
    assert patient_key(PATIENT_ID, "a") == patient_key(PATIENT_ID, "a")
    assert patient_key("", "a") == "" and patient_key(PATIENT_ID, None) == ""
    assert PATIENT_ID not in patient_key(PATIENT_ID, "a")


# ---------------------------------------------------------------------------------------
# Every file in pydicom's test data
# ---------------------------------------------------------------------------------------


def pydicom_test_files() -> list[Path]:
    """pydicom's bundled test files and the pydicom-data (``data_store``) ones, local only."""
    from pydicom.data import get_testdata_files

    return sorted({Path(p) for p in get_testdata_files() if Path(p).is_file()})


EXPECTED = {
    "reportsi.dcm": ("skipped", "SR"),
    "test-SR.dcm": ("skipped", "SR"),
    "rtplan.dcm": ("skipped", "RT Plan"),
    "README.txt": ("skipped", "not a DICOM file"),
    "SC_rgb.dcm": ("skipped", "colour"),
    "US1_J2KR.dcm": ("skipped", "colour"),
    "MR_truncated.dcm": ("failed", "truncated"),
    "emri_small_jpeg_2k_lossless_too_short.dcm": ("failed", "truncated"),
    "meta_missing_tsyntax.dcm": ("failed", "Transfer Syntax"),
    "JPEG2000-embedded-sequence-delimiter.dcm": ("failed", "JPEG 2000"),
    "MR_small_jpeg_ls_lossless.dcm": ("imported", "window:LINEAR"),
    "MR_small_jp2klossless.dcm": ("imported", "window:LINEAR"),
    "MR_small_RLE.dcm": ("imported", "window:LINEAR"),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ("imported", "window:LINEAR"),
    "JPEGLSNearLossless_16.dcm": ("imported", "fallback:no-voi"),
    "RG1_UNCR.dcm": ("imported", "window:LINEAR"),  # MONOCHROME1 CR
    "vlut_04.dcm": ("imported", "lut"),
    "mlut_18.dcm": ("imported", ""),
    "emri_small.dcm": ("imported", ""),
    "eCT_Supplemental.dcm": ("imported", "window:LINEAR"),  # window in the functional groups
    "MR_small_bigendian.dcm": ("imported", "window:LINEAR"),
}


def classify(path: Path, options: NormalizeOptions) -> tuple[str, str, int]:
    try:
        images = load_display_frames(path, options, SECRET)
    except (SkipFile, FailFile) as problem:
        assert problem.reason.strip(), path
        assert str(path) not in problem.reason
        return problem.status, problem.reason, 0
    for frame in images.frames:
        assert frame.pixels.dtype == np.uint8 and frame.pixels.ndim == 2
        assert max(frame.pixels.shape) <= options.long_side
    return "imported", images.hints.voi, len(images.frames)


def test_every_pydicom_test_file_is_imported_skipped_or_failed():
    files = pydicom_test_files()
    assert len(files) > 150, "pydicom's test data (and pydicom-data) should be installed"
    outcomes = {path: classify(path, NormalizeOptions(long_side=64)) for path in files}
    by_name = {path.name: outcome for path, outcome in outcomes.items()}
    for name, (status, reason_part) in EXPECTED.items():
        assert name in by_name, f"{name} missing from pydicom's test data"
        got_status, got_reason, _ = by_name[name]
        assert got_status == status, (name, got_status, got_reason)
        assert reason_part in got_reason, (name, got_reason)
    assert by_name["emri_small.dcm"][2] == 10  # ten frames, ten displays
    statuses = [status for status, _, _ in outcomes.values()]
    assert statuses.count("imported") > 50 and statuses.count("skipped") > 50


def test_pydicom_test_images_fast_matches_exact():
    """Real-world headers (CT rescale, MONOCHROME1 CR, VOI LUT, modality LUT): fast == exact within tolerance."""
    names = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "RG3_UNCR.dcm", "vlut_04.dcm", "mlut_18.dcm",
             "MR_small_padded.dcm", "JPEG2000.dcm", "emri_small.dcm", "rtdose.dcm"]
    by_name = {p.name: p for p in pydicom_test_files()}
    for name in names:
        fast = load_display_frames(by_name[name], NormalizeOptions(long_side=128))
        exact = load_display_frames(by_name[name], NormalizeOptions(long_side=128, exact=True))
        for f, e in zip(fast.frames, exact.frames, strict=True):
            mean, worst = grey_diff(f.pixels, e.pixels)
            assert mean <= 0.5 and worst <= 3, (name, mean, worst)
