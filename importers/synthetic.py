"""Synthetic mammography DICOMs with known labels, for the demo and the tests.

No real mammograms are available to mammoflag's developers, so this module draws them:
a breast-shaped, textured field of view (or, for magnification views, a zoomed field
with the edge of the small magnification paddle), optionally with bright metallic
biopsy tools and markers (needle, clip, ring marker; sometimes at the image edge).

The pixels are then stored the way different vendors store them, so the importer sees
the header conventions it must handle in the wild:

- Hologic-like: MONOCHROME2, 12 bits stored, several LINEAR windows, view modifier codes.
- GE-like: MONOCHROME2, 14 bits stored, a SIGMOID window, Pixel Padding Value, no view
  modifier codes at all (headers are unreliable: the image must tell a mag view).
- Fuji-like: MONOCHROME1 with Presentation LUT Shape INVERSE (the same inversion said
  twice: invert once), a VOI LUT Sequence instead of a window, 12 bits stored.
- Siemens-like: MONOCHROME2, 16 bits stored, Rescale Slope/Intercept that are not 1/0,
  Pixel Padding Value, old-style SRT view modifier codes.

Some images are FOR PROCESSING (raw data, no VOI), some are compressed (RLE, JPEG-LS,
JPEG 2000 lossless, through pydicom 3's encoders), one per cohort has two frames.
Patient name, ID, birth date and accession number are filled with fake values so the
privacy tests have something that must not leak. Everything is deterministic per seed.
"""

from __future__ import annotations

import csv
import hashlib
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

GROUND_TRUTH_FILE = "ground_truth.csv"
GROUND_TRUTH_COLUMNS = ["file", "sop_instance_uid", "frame", "study_instance_uid", "patient_id_hash",
                        "biopsy_tool", "mag_view", "manufacturer"]

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

# Compression names accepted by ``compressions=`` and the transfer syntaxes they write.
TRANSFER_SYNTAXES = {
    "none": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
    "jpeg-ls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
}
# One image in this cycle per compression: most are uncompressed, every kind appears in a small cohort.
COMPRESSION_CYCLE = ("none", "rle", "none", "jpeg-ls", "none", "jpeg2000", "none")

# Metal is brighter than any tissue: the display value a tool gets, beyond the window's top (0..1).
METAL = 1.3


@dataclass(frozen=True)
class VendorStyle:
    """How one (fictional but typical) vendor writes a mammogram's pixels and header."""

    key: str
    manufacturer: str
    model: str
    size: tuple[int, int]  # realistic (rows, cols) of a full-field image
    bits_stored: int
    photometric: str  # MONOCHROME1 stores bright tissue as low values
    voi: str  # "windows" (several LINEAR), "sigmoid", "lut" (VOI LUT Sequence), "linear"
    window: tuple[float, float]  # modality values (after rescale) shown as black .. white
    rescale: tuple[float, float] = (1.0, 0.0)  # slope, intercept
    padding_value: int | None = None  # stored value written outside the breast (Pixel Padding Value)
    modifier_codes: str | None = None  # "SCT" or "SRT": how mag views are coded; None: never coded


VENDORS: tuple[VendorStyle, ...] = (
    VendorStyle("hologic", "HOLOGIC, Inc.", "Selenia Dimensions", (4096, 3328), 12, "MONOCHROME2", "windows",
                (300.0, 3800.0), modifier_codes="SCT"),
    VendorStyle("ge", "GE MEDICAL SYSTEMS", "Senographe Pristina", (2850, 2294), 14, "MONOCHROME2", "sigmoid",
                (1500.0, 14000.0), padding_value=0),
    VendorStyle("fuji", "FUJIFILM Corporation", "FDR-3000AWS", (3540, 2832), 12, "MONOCHROME1", "lut",
                (200.0, 3900.0)),
    VendorStyle("siemens", "SIEMENS", "Mammomat Revelation", (3328, 2560), 16, "MONOCHROME2", "linear",
                (2000.0, 30000.0), rescale=(0.5, -400.0), padding_value=0, modifier_codes="SRT"),
)
VENDOR_BY_KEY = {v.key: v for v in VENDORS}

BIOPSY_TOOLS = ("needle", "clip", "ring")
STANDARD_VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))


@dataclass
class ImagePlan:
    """Everything decided about one synthetic image before it is drawn."""

    laterality: str
    view: str  # CC, MLO, ML (magnification views are usually CC or ML)
    mag_view: bool
    tools: tuple[str, ...]  # biopsy tools / markers drawn in it
    compression: str
    for_processing: bool
    frames: int = 1
    file_name: str = ""


@dataclass
class StudyPlan:
    index: int
    vendor: VendorStyle
    patient: dict[str, str]
    images: list[ImagePlan] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Public API


def write_synthetic_cohort(
    out_dir: str | Path,
    n_studies: int,
    seed: int = 0,
    size: int | None = None,
    images_per_study: tuple[int, int] = (2, 4),
    vendors: Sequence[str] | None = None,
    compressions: Sequence[str] | None = None,
    biopsy_rate: float = 0.4,
    mag_rate: float = 0.35,
    for_processing_every: int = 11,
    multiframe: bool = True,
) -> Path:
    """Write ``n_studies`` synthetic mammography studies under ``out_dir``; return ground_truth.csv's path.

    ``size`` is the long side in pixels of every image (each vendor keeps its aspect);
    None draws each vendor's realistic detector size (slow: for the demo). Ground truth
    has one row per frame: ``file`` (relative to out_dir), UIDs, a hash of the fake
    PatientID, the labels (0/1) and the manufacturer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen_vendors = [VENDOR_BY_KEY[k] for k in vendors] if vendors else list(VENDORS)
    cycle = tuple(c for c in COMPRESSION_CYCLE if c in set(compressions)) if compressions else COMPRESSION_CYCLE
    if not cycle:
        cycle = tuple(compressions or ("none",))
    for name in cycle:
        if name not in TRANSFER_SYNTAXES:
            raise ValueError(f"unknown compression {name!r}; choose from {sorted(TRANSFER_SYNTAXES)}")
    plans = plan_cohort(n_studies, seed, chosen_vendors, cycle, images_per_study, biopsy_rate, mag_rate,
                        for_processing_every, multiframe)
    gt_path = out / GROUND_TRUTH_FILE
    with open(gt_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=GROUND_TRUTH_COLUMNS)
        writer.writeheader()
        for study in plans:
            for row in _write_study(out, study, seed, size):
                writer.writerow(row)
    return gt_path


def read_ground_truth(path: str | Path) -> list[dict[str, str]]:
    """ground_truth.csv as a list of rows (labels stay the strings "0"/"1")."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def patient_id_hash(patient_id: str) -> str:
    """An unkeyed grouping hash of the fake PatientID (ground truth only; the importer uses a keyed one)."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Planning: which studies, images, labels, header styles (cheap; drawing comes later)


def plan_cohort(n_studies: int, seed: int, vendors: Sequence[VendorStyle], compressions: Sequence[str],
                images_per_study: tuple[int, int], biopsy_rate: float, mag_rate: float,
                for_processing_every: int, multiframe: bool) -> list[StudyPlan]:
    rng = np.random.default_rng([seed, 20240])
    plans: list[StudyPlan] = []
    image_counter = 0
    multiframe_study = n_studies // 2 if multiframe and n_studies else -1
    for index in range(n_studies):
        vendor = vendors[(index + seed) % len(vendors)]  # every vendor appears in any small cohort
        study = StudyPlan(index, vendor, _fake_patient(rng))
        n_images = int(rng.integers(images_per_study[0], images_per_study[1] + 1))
        views = list(STANDARD_VIEWS)
        rng.shuffle(views)
        # A biopsy clip or marker lies in one breast: every view of that side shows it.
        tool_side = str(rng.choice(["L", "R"])) if rng.random() < biopsy_rate or index == multiframe_study else None
        tool_kinds = _tool_kinds(rng, needle_ok=True)
        has_mag = rng.random() < mag_rate
        for j in range(n_images):
            laterality, view = views[j % len(views)]
            mag = has_mag and j == n_images - 1
            if mag:
                view = str(rng.choice(["CC", "ML"]))
            tools = tool_kinds if laterality == tool_side else ()
            if tools and j % 2 == 1:
                tools = _tool_kinds(rng, needle_ok=False)  # the other view of a side shows clips, not needles
            compression = compressions[image_counter % len(compressions)]
            for_processing = for_processing_every > 0 and image_counter % for_processing_every == 5
            study.images.append(ImagePlan(laterality, view, mag, tools, compression, for_processing))
            image_counter += 1
        if index == multiframe_study:
            first = study.images[0]
            first.frames, first.compression, first.for_processing = 2, "none", False
            if not first.tools:
                first.laterality = tool_side or first.laterality
                first.tools = ("needle",)
        for j, image in enumerate(study.images):
            image.file_name = _file_name(rng, j)
        plans.append(study)
    return plans


def _tool_kinds(rng: np.random.Generator, needle_ok: bool) -> tuple[str, ...]:
    kinds = BIOPSY_TOOLS if needle_ok else BIOPSY_TOOLS[1:]
    first = str(rng.choice(kinds))
    if rng.random() < 0.25:
        return first, str(rng.choice(BIOPSY_TOOLS[1:]))
    return (first,)


def _file_name(rng: np.random.Generator, j: int) -> str:
    # The importer reads every file whatever its name: not all archives use .dcm.
    style = int(rng.integers(0, 3))
    return (f"IMG{j + 1:03d}.dcm", f"IM{j + 1:05d}", f"I{j + 1:04d}.DCM")[style]


def _fake_patient(rng: np.random.Generator) -> dict[str, str]:
    """Fake identifiers that are easy to search for (letters, so they never hide inside a UID)."""
    letters = string.ascii_uppercase

    def word(n: int) -> str:
        return "".join(rng.choice(list(letters), n))

    year, month, day = int(rng.integers(1935, 1985)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return {
        "PatientName": f"FAKE{word(6)}^{word(5).title()}",
        "PatientID": f"PID{word(9)}",
        "PatientBirthDate": f"{year:04d}{month:02d}{day:02d}",
        "AccessionNumber": f"ACC{word(8)}",
        "OtherPatientIDs": f"OID{word(8)}",
        "ReferringPhysicianName": f"DR{word(6)}^{word(4).title()}",
        "InstitutionName": f"Clinic {word(5).title()}",
    }


# --------------------------------------------------------------------------------------------
# Drawing: display intensities in 0..1 (1 = bright: dense tissue, metal above 1)


def draw_image(rng: np.random.Generator, rows: int, cols: int, plan: ImagePlan) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image: (display intensity float32 0..~1.3, mask of air outside the breast)."""
    if plan.mag_view:
        intensity, air = _magnification_field(rng, rows, cols, plan.laterality)
    else:
        intensity, air = _contact_view(rng, rows, cols, plan.laterality, plan.view)
    if plan.tools:
        metal = _draw_tools(rng, rows, cols, plan.tools, air)
        intensity = np.where(metal, np.float32(METAL), intensity)
        air &= ~metal
    intensity += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.012)
    return intensity, air


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Cloud-like texture: coarse random grids upsampled bicubically, summed over a few octaves."""
    total = np.zeros((rows, cols), dtype=np.float32)
    weight = 1.0
    for _ in range(octaves):
        gh, gw = max(2, int(rows / cell) + 2), max(2, int(cols / cell) + 2)
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((cols, rows), Image.Resampling.BICUBIC)
        total += np.asarray(up, dtype=np.float32) * np.float32(weight)
        cell, weight = max(cell / 2.2, 1.5), weight * 0.55
    return total / np.float32(1.6)


def _chest_wall_distance(rows: int, cols: int, laterality: str) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): u = distance from the chest wall as a fraction of the width, v = height fraction."""
    x = (np.arange(cols, dtype=np.float32) + 0.5) / cols
    u = x if laterality == "L" else 1.0 - x  # L breasts face right, R breasts face left here
    v = (np.arange(rows, dtype=np.float32) + 0.5) / rows
    return u[None, :], v[:, None]


def _contact_view(rng, rows, cols, laterality, view):
    u, v = _chest_wall_distance(rows, cols, laterality)
    depth = np.float32(rng.uniform(0.55, 0.85))  # how far the nipple reaches across the image
    half_height = np.float32(rng.uniform(0.30, 0.42) if view == "CC" else rng.uniform(0.40, 0.48))
    centre = np.float32(rng.uniform(0.45, 0.55) if view == "CC" else rng.uniform(0.50, 0.56))
    r2 = (u / depth) ** 2 + ((v - centre) / half_height) ** 2
    thickness = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))  # compressed breast thins towards the skin line
    inside = r2 < 1.0
    density = _smooth_noise(rng, rows, cols, cell=max(rows, cols) / 14.0)
    tissue = np.float32(0.26) + np.float32(0.25) * np.sqrt(thickness) + np.float32(0.08) * density * thickness
    if view == "MLO":
        # The pectoral muscle: a bright triangle along the chest wall at the top.
        reach = np.float32(rng.uniform(0.25, 0.4))
        pectoral = u < reach * (1.0 - v / np.float32(rng.uniform(0.45, 0.6)))
        tissue = np.where(pectoral & inside, tissue + np.float32(0.15), tissue)
    air_level = np.float32(0.04)
    intensity = np.where(inside, tissue, air_level).astype(np.float32)
    return intensity, ~inside


def _magnification_field(rng, rows, cols, laterality):
    """A magnification view: tissue fills the field, texture zoomed, the small paddle's edge visible."""
    u, v = _chest_wall_distance(rows, cols, laterality)
    density = _smooth_noise(rng, rows, cols, cell=max(rows, cols) / 4.5, octaves=2)
    tissue = np.float32(0.38) + np.float32(0.12) * density
    # The magnification paddle covers a rectangle; tissue outside it is thicker (brighter) and the
    # paddle's rim shows as a bright straight edge.
    top, bottom = rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95)
    reach = rng.uniform(0.6, 0.85)
    under_paddle = (v > top) & (v < bottom) & (u < reach)
    rim = np.float32(max(0.006, 2.5 / max(rows, cols)))
    near_edge = (under_paddle & ((np.abs(v - top) < rim) | (np.abs(v - bottom) < rim) | (np.abs(u - reach) < rim)))
    intensity = np.where(under_paddle, tissue, tissue + np.float32(0.16))
    intensity = np.where(near_edge, np.float32(0.75), intensity)
    # The breast ends beyond the paddle in one corner (air), far from the chest wall.
    corner = ((u - 1.05) / 0.45) ** 2 + ((v - (0.0 if rng.random() < 0.5 else 1.0)) / 0.5) ** 2 < 1.0
    corner = np.broadcast_to(corner, (rows, cols))
    intensity = np.where(corner & ~under_paddle, np.float32(0.04), intensity).astype(np.float32)
    # A few faint calcifications: what magnification views are taken for.
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = int(rng.uniform(0.3, 0.7) * rows), int(rng.uniform(0.3, 0.7) * cols)
        r = max(1, int(0.004 * max(rows, cols)))
        intensity[max(0, cy - r):cy + r, max(0, cx - r):cx + r] += np.float32(0.2)
    return intensity, corner & ~under_paddle


def _draw_tools(rng, rows, cols, tools, air) -> np.ndarray:
    """Metal: needles, clips and ring markers, drawn at full resolution."""
    long_side = max(rows, cols)
    mask = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(mask)
    width = max(2, round(0.016 * long_side))  # thick enough to survive resizing to 64 px
    inside = np.argwhere(~air[:: max(1, rows // 64), :: max(1, cols // 64)])
    for kind in tools:
        near_edge = rng.random() < 0.3  # the hard cases: markers at the image edge
        if near_edge or len(inside) == 0:
            margin = rng.uniform(0.02, 0.05)
            side = int(rng.integers(0, 4))
            along = rng.uniform(0.1, 0.9)
            fx, fy = [(margin, along), (1 - margin, along), (along, margin), (along, 1 - margin)][side]
            cx, cy = fx * cols, fy * rows
        else:
            py, px = inside[int(rng.integers(0, len(inside)))]
            cy, cx = py * max(1, rows // 64), px * max(1, cols // 64)
        if kind == "needle":
            # A biopsy needle comes in from the top or bottom edge towards the lesion, with a hub.
            start_y = 0 if rng.random() < 0.5 else rows - 1
            start_x = cx + rng.uniform(-0.25, 0.25) * cols
            draw.line([(start_x, start_y), (cx, cy)], fill=255, width=width)
            hub = width * 2
            draw.rectangle([start_x - hub, start_y - hub * 2, start_x + hub, start_y + hub * 2], fill=255)
        elif kind == "clip":
            # A marker clip: a short zig-zag ribbon of metal.
            size = rng.uniform(0.07, 0.10) * long_side
            angle = rng.uniform(0, math.pi)
            points = []
            for k in range(4):
                along = (k / 3 - 0.5) * size
                across = (0.18 * size) * (1 if k % 2 else -1)
                points.append((cx + along * math.cos(angle) - across * math.sin(angle),
                               cy + along * math.sin(angle) + across * math.cos(angle)))
            draw.line(points, fill=255, width=width, joint="curve")
        else:
            # A ring (skin / scar) marker: a metal circle.
            radius = rng.uniform(0.03, 0.045) * long_side
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=255, width=width)
    return np.asarray(mask) > 0


# --------------------------------------------------------------------------------------------
# Storing: display intensities -> stored values the way a vendor writes them


def stored_values(intensity: np.ndarray, air: np.ndarray, vendor: VendorStyle, for_processing: bool) -> np.ndarray:
    """Stored pixel values (uint16 within BitsStored) that display as ``intensity`` with the vendor's header."""
    low, high = vendor.window
    brightness = intensity
    if vendor.photometric == "MONOCHROME1":
        brightness = 1.0 - intensity  # MONOCHROME1: the lowest value is displayed white
    if for_processing:
        # Raw detector data: no VOI in the header, a wider and shifted range than any window.
        low, high = low * 0.6, high * 1.1
    modality = np.float32(low) + brightness * np.float32(high - low)
    slope, intercept = vendor.rescale
    stored = (modality - np.float32(intercept)) / np.float32(slope)
    top = (1 << vendor.bits_stored) - 1
    stored = np.clip(np.rint(stored), 1, top).astype(np.uint16)
    if vendor.padding_value is not None:
        stored[air] = vendor.padding_value  # outside the breast: Pixel Padding Value, not air
    return stored


def _voi_lut(vendor: VendorStyle) -> tuple[list[int], list[int]]:
    """A VOI LUT (descriptor, data) for the whole stored range: a smooth S-curve between the window ends."""
    entries = 1 << vendor.bits_stored
    low, high = vendor.window
    x = np.arange(entries, dtype=np.float64) * vendor.rescale[0] + vendor.rescale[1]
    centre, width = (low + high) / 2, high - low
    curve = 1.0 / (1.0 + np.exp(-5.0 * (x - centre) / width))
    curve = (curve - curve.min()) / (curve.max() - curve.min())
    out_bits = 12
    data = np.rint(curve * ((1 << out_bits) - 1)).astype(np.uint16)
    # LUT Descriptor: number of entries (0 means 65536), first stored value mapped, bits per entry.
    return [entries % 65536, 0, out_bits], data.tolist()


# --------------------------------------------------------------------------------------------
# Writing DICOM files


def _uid(*parts: object) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (pydicom's generate_uid(prefix=None) is random)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"  # 128 bits: at most 39 digits, 44 characters in all


def _image_size(vendor: VendorStyle, size: int | None) -> tuple[int, int]:
    rows, cols = vendor.size
    if size:
        scale = size / max(rows, cols)
        rows, cols = max(8, round(rows * scale)), max(8, round(cols * scale))
    return rows, cols


def _write_study(out: Path, study: StudyPlan, seed: int, size: int | None) -> Iterator[dict[str, object]]:
    vendor = study.vendor
    study_uid = _uid("study", seed, study.index)
    series_uids: dict[tuple[str, bool], str] = {}
    folder = out / f"study{study.index:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for j, plan in enumerate(study.images):
        rng = np.random.default_rng([seed, study.index, j])
        rows, cols = _image_size(vendor, size)
        frames = []
        for _ in range(plan.frames):
            intensity, air = draw_image(rng, rows, cols, plan)
            frames.append(stored_values(intensity, air, vendor, plan.for_processing))
        pixels = frames[0] if plan.frames == 1 else np.stack(frames)
        series_key = (plan.laterality, plan.mag_view)
        series_uid = series_uids.setdefault(series_key, _uid("series", seed, study.index, *series_key))
        sop_uid = _uid("sop", seed, study.index, j)
        ds = _dataset(study, plan, study_uid, series_uid, sop_uid, j, pixels)
        path = folder / plan.file_name
        _save(ds, path, pixels, plan.compression)
        for frame in range(plan.frames):
            yield {
                "file": path.relative_to(out).as_posix(),
                "sop_instance_uid": sop_uid,
                "frame": frame,
                "study_instance_uid": study_uid,
                "patient_id_hash": patient_id_hash(study.patient["PatientID"]),
                "biopsy_tool": int(bool(plan.tools)),
                "mag_view": int(plan.mag_view),
                "manufacturer": vendor.manufacturer,
            }


def _dataset(study: StudyPlan, plan: ImagePlan, study_uid: str, series_uid: str, sop_uid: str,
             number: int, pixels: np.ndarray):
    from pydicom.dataset import Dataset, FileMetaDataset

    vendor = study.vendor
    sop_class = MG_FOR_PROCESSING if plan.for_processing else MG_FOR_PRESENTATION
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = TRANSFER_SYNTAXES["none"]

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MG"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"2023{1 + study.index % 12:02d}{1 + study.index % 28:02d}"
    ds.StudyTime = "101500"
    ds.StudyID = f"S{study.index}"
    ds.SeriesNumber = 2 if plan.mag_view else 1
    ds.InstanceNumber = number + 1
    for keyword, value in study.patient.items():  # fake identifiers: must never leave the importer
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    ds.Manufacturer = vendor.manufacturer
    ds.ManufacturerModelName = vendor.model
    ds.PresentationIntentType = "FOR PROCESSING" if plan.for_processing else "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] + [v for v in [_image_type_3(vendor, plan)] if v]
    ds.ImageLaterality = plan.laterality
    ds.Laterality = plan.laterality
    ds.ViewPosition = plan.view
    ds.BodyPartExamined = "BREAST"
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ["A", "R" if plan.laterality == "L" else "L"] if plan.view == "CC" else ["A", "FR"]
    _view_codes(ds, plan, vendor)
    if plan.mag_view:
        ds.EstimatedRadiographicMagnificationFactor = "1.8"
    else:
        ds.EstimatedRadiographicMagnificationFactor = "1.07"  # > 1 on contact views too: a soft hint only

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = vendor.photometric
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = vendor.bits_stored
    ds.HighBit = vendor.bits_stored - 1
    ds.PixelRepresentation = 0
    if plan.frames > 1:
        ds.NumberOfFrames = plan.frames
    ds.RescaleSlope, ds.RescaleIntercept = f"{vendor.rescale[0]:g}", f"{vendor.rescale[1]:g}"
    ds.RescaleType = "US"
    if vendor.padding_value is not None:
        ds.PixelPaddingValue = vendor.padding_value
    # MONOCHROME1 and Presentation LUT Shape INVERSE say the same thing (low values are white).
    ds.PresentationLUTShape = "INVERSE" if vendor.photometric == "MONOCHROME1" else "IDENTITY"
    if not plan.for_processing:
        _voi(ds, vendor)
    return ds


def _image_type_3(vendor: VendorStyle, plan: ImagePlan) -> str:
    # Only stereotactic procedure images say so in Image Type; a clip seen later is in no header.
    if "needle" in plan.tools and vendor.key == "hologic":
        return "PREFIRE"
    return ""


def _view_codes(ds, plan: ImagePlan, vendor: VendorStyle) -> None:
    from pydicom.dataset import Dataset

    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator = {"CC": ("399162004", "SCT"), "MLO": ("399368009", "SCT"),
                                                   "ML": ("399260004", "SCT")}[plan.view]
    view.CodeMeaning = {"CC": "cranio-caudal", "MLO": "medio-lateral oblique", "ML": "medio-lateral"}[plan.view]
    modifiers = []
    if plan.mag_view and vendor.modifier_codes:
        modifier = Dataset()
        if vendor.modifier_codes == "SCT":
            modifier.CodeValue, modifier.CodingSchemeDesignator = "399163009", "SCT"
        else:
            modifier.CodeValue, modifier.CodingSchemeDesignator = "R-102D6", "SRT"
        modifier.CodeMeaning = "magnification"
        modifiers.append(modifier)
    view.ViewModifierCodeSequence = modifiers
    ds.ViewCodeSequence = [view]


def _voi(ds, vendor: VendorStyle) -> None:
    from pydicom.dataset import Dataset

    low, high = vendor.window
    centre, width = (low + high) / 2, high - low
    if vendor.voi == "lut":
        descriptor, data = _voi_lut(vendor)
        item = Dataset()
        item.add_new(0x00283002, "US", descriptor)  # LUT Descriptor (US or SS: US here)
        item.add_new(0x00283006, "US", data)  # LUT Data
        item.LUTExplanation = "NORMAL"
        ds.VOILUTSequence = [item]
        return
    if vendor.voi == "windows":
        # Several windows: the first is the one to use; the others are harder / softer variants.
        ds.WindowCenter = [f"{centre:.0f}", f"{centre + 0.1 * width:.0f}", f"{centre - 0.1 * width:.0f}"]
        ds.WindowWidth = [f"{width:.0f}", f"{0.7 * width:.0f}", f"{1.3 * width:.0f}"]
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER", "SOFTER"]
        ds.VOILUTFunction = "LINEAR"
        return
    ds.WindowCenter, ds.WindowWidth = f"{centre:.0f}", f"{width:.0f}"
    ds.VOILUTFunction = "SIGMOID" if vendor.voi == "sigmoid" else "LINEAR"


def _save(ds, path: Path, pixels: np.ndarray, compression: str) -> None:
    if compression == "none":
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    else:
        ds.compress(TRANSFER_SYNTAXES[compression], pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------
# Bad input for importer tests: each file with the outcome the importer must report


def write_problem_files(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Files the importer must report without stopping; returns {relative path: expected status}.

    non-DICOM text, an empty file, a truncated mammogram, a Structured Report (no pixels),
    an RGB colour image, a DICOM whose file meta lacks the Transfer Syntax UID, and a copy
    of a good file under another name (a duplicate SOP Instance UID).
    """
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    (out / "notes.txt").write_text("not a DICOM file\n")
    expected["notes.txt"] = "skipped"
    (out / "empty.dcm").write_bytes(b"")
    expected["empty.dcm"] = "skipped"

    good_dir = out / "good"
    gt = write_synthetic_cohort(good_dir, 1, seed=seed + 7, size=128, images_per_study=(1, 1),
                                vendors=["hologic"], compressions=["none"], biopsy_rate=0, mag_rate=0,
                                for_processing_every=0, multiframe=False)
    good = good_dir / read_ground_truth(gt)[0]["file"]
    gt.unlink()  # only the DICOM matters here
    expected[good.relative_to(out).as_posix()] = "imported"

    data = good.read_bytes()
    (out / "truncated.dcm").write_bytes(data[: len(data) - len(data) // 3])
    expected["truncated.dcm"] = "failed"
    # Same SOP Instance UID as the good file; found after it (files before subfolders, by name).
    (out / "zz_copies").mkdir(exist_ok=True)
    (out / "zz_copies" / "copy_of_good").write_bytes(data)
    expected["zz_copies/copy_of_good"] = "skipped"

    # No Transfer Syntax UID in the file meta: native pixels can be read with the encoding the
    # data elements show (imported, with a note); compressed ones cannot (which codec?).
    no_syntax = dcmread(good)
    del no_syntax.file_meta.TransferSyntaxUID
    no_syntax.SOPInstanceUID = no_syntax.file_meta.MediaStorageSOPInstanceUID = _uid("no-syntax", seed)
    no_syntax.save_as(out / "no_transfer_syntax_native.dcm", enforce_file_format=False, little_endian=True,
                      implicit_vr=False)
    expected["no_transfer_syntax_native.dcm"] = "imported"
    compressed = dcmread(good)
    compressed.compress(TRANSFER_SYNTAXES["rle"], generate_instance_uid=False)
    compressed.SOPInstanceUID = compressed.file_meta.MediaStorageSOPInstanceUID = _uid("no-syntax-rle", seed)
    del compressed.file_meta.TransferSyntaxUID
    compressed.save_as(out / "no_transfer_syntax_rle.dcm", enforce_file_format=False, little_endian=True,
                       implicit_vr=False)
    expected["no_transfer_syntax_rle.dcm"] = "failed"

    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = _uid("sr", seed)
    sr.file_meta.TransferSyntaxUID = TRANSFER_SYNTAXES["none"]
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = _uid("sr-study", seed), _uid("sr-series", seed), "SR"
    sr.PatientName, sr.PatientID = "FAKESRPATIENT^Nobody", "PIDSRREPORT"
    sr.save_as(out / "report.dcm", enforce_file_format=True)
    expected["report.dcm"] = "skipped"

    colour = dcmread(good)
    rgb = np.zeros((32, 24, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    colour.SOPInstanceUID = colour.file_meta.MediaStorageSOPInstanceUID = _uid("colour", seed)
    colour.Rows, colour.Columns = 32, 24
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "RGB", 0
    colour.BitsAllocated, colour.BitsStored, colour.HighBit = 8, 8, 7
    for keyword in ("PixelPaddingValue", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
                    "VOILUTFunction", "PresentationLUTShape"):
        if keyword in colour:
            delattr(colour, keyword)
    colour.PixelData = rgb.tobytes()
    colour.save_as(out / "colour.dcm", enforce_file_format=True)
    expected["colour.dcm"] = "skipped"
    return expected
