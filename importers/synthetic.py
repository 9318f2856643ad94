"""Synthetic mammography DICOMs with known labels, for the demo, the tests and the benchmarks.

No real mammograms are available to mammoflag's developers, so this module draws them:
a breast-shaped, textured field of view (or, for magnification views, a zoomed field
with the edge of the small magnification paddle), optionally with biopsy tools and
markers, and stores the pixels the way different vendors store them.

What is drawn comes from a *family* of distributions (``SynthParams``; ``FAMILIES``):

- ``classic``: the original generator, kept bit-for-bit: thick bright needles, clips and
  ring markers 7-10 % of the long side, four vendors. It is still the default of
  ``write_synthetic_cohort`` (the demo and the existing tests depend on its look), but it
  is far easier than real data and than what an independent tester draws.
- ``standard`` and ``shifted``: two *different* hard, wide worlds (train on one, test on
  the other to measure generator shift). Markers as small as ~0.8 % of the long side and
  up to a few %, eight shapes (ring, cross, coil, spiral, wire, cylinder, zig-zag clip,
  BB cluster, needle with hub), 1-3 per image, any rotation, from saturated metal down to
  a faint step above dense tissue, anywhere in the breast, in dense tissue, or cut by the
  image edge; distractors on every image whatever its label (calcification clusters,
  popcorn and rim calcifications, vessels, calcified vessels, skin folds, burned-in text
  such as "L CC"); magnification views with or without paddle edge, line or grid
  artefacts and air, with varied zoom; small/large and dense/fatty breasts; per-image
  noise, gain and gamma (a vendor's processing look); six vendor header conventions.
  Every image's difficulty attributes go to ground_truth.csv (``DIFFICULTY_COLUMNS``).

Header conventions (``VENDORS``: the classic four; ``EXTRA_VENDORS``: used by the hard families):

- Hologic-like: MONOCHROME2, 12 bits stored, several LINEAR windows, view modifier codes.
- GE-like: MONOCHROME2, 14 bits stored, a SIGMOID window, Pixel Padding Value, no view
  modifier codes at all (headers are unreliable: the image must tell a mag view).
- Fuji-like: MONOCHROME1 with Presentation LUT Shape INVERSE (the same inversion said
  twice: invert once), a VOI LUT Sequence instead of a window, 12 bits stored.
- Siemens-like: MONOCHROME2, 16 bits stored, Rescale Slope/Intercept that are not 1/0,
  Pixel Padding Value, old-style SRT view modifier codes.
- Planmed-like: MONOCHROME1 *without* Presentation LUT Shape (MONOCHROME1 alone says
  "invert"), 14 bits stored, one LINEAR_EXACT window, Pixel Padding Value at the top of
  the stored range (air is the highest value in MONOCHROME1).
- IMS-like small-field detector: 720 x 560, 10 bits stored, several windows without VOI
  LUT Function (the default, LINEAR, applies), no view modifier codes, no Estimated
  Radiographic Magnification Factor.

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
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

GROUND_TRUTH_FILE = "ground_truth.csv"
BASE_GROUND_TRUTH_COLUMNS = ["file", "sop_instance_uid", "frame", "study_instance_uid", "patient_id_hash",
                             "biopsy_tool", "mag_view", "manufacturer"]
# Per-image difficulty attributes, after the base columns (readers key rows by name: read_ground_truth).
# Empty where a family does not know the value (classic draws no distractors and measures no contrast).
DIFFICULTY_COLUMNS = [
    "family",  # SynthParams.name
    "vendor",  # VendorStyle.key
    "view",  # CC, MLO, ML
    "detector",  # "ROWSxCOLS" of the stored image
    "marker_count",  # markers drawn (0 on negatives)
    "marker_shapes",  # ";"-joined shapes, e.g. "ring;cross"
    "marker_size_frac",  # the largest marker's nominal extent / the image's long side
    "marker_contrast",  # the most conspicuous marker's mean step over its background, display units 0..1
    "marker_metal",  # 1: some marker is saturated metal (above the window top)
    "marker_cut_by_edge",  # 1: some marker is only partly inside the image
    "marker_in_dense",  # 1: some marker lies on dense tissue (top quartile of the breast's intensities)
    "marker_visible_px",  # marker pixels (coverage >= 1/2) inside the image, at the stored resolution
    "distractors",  # ";"-joined: calcs, popcorn, rim_calc, vessel, calc_vessel, skin_fold, text
    "artefacts",  # ";"-joined: paddle_rect, paddle_round, lines, grid, air (air: mag view shows the skin line)
    "breast_density",  # glandular fraction drawn, 0 (fatty) .. 1 (dense)
    "noise_sigma",  # quantum-noise level drawn
    "marker_boxes",  # ";"-joined "row0 col0 row1 col1" (stored pixels, end exclusive) of each connected marker part
]
GROUND_TRUTH_COLUMNS = BASE_GROUND_TRUTH_COLUMNS + DIFFICULTY_COLUMNS

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
    voi: str  # "windows" (several), "sigmoid", "lut" (VOI LUT Sequence), "linear", "linear_exact"
    window: tuple[float, float]  # modality values (after rescale) shown as black .. white
    rescale: tuple[float, float] = (1.0, 0.0)  # slope, intercept
    padding_value: int | None = None  # stored value written outside the breast (Pixel Padding Value)
    modifier_codes: str | None = None  # "SCT" or "SRT": how mag views are coded; None: never coded
    presentation_lut_shape: bool = True  # write Presentation LUT Shape (INVERSE / IDENTITY)
    voi_lut_function: bool = True  # write VOI LUT Function (absent means LINEAR)
    magnification_factor: bool = True  # write Estimated Radiographic Magnification Factor


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
EXTRA_VENDORS: tuple[VendorStyle, ...] = (
    # MONOCHROME1 with no Presentation LUT Shape: the photometric interpretation alone inverts. Air is
    # displayed black, i.e. stored as the top value, and that is what the padding value says.
    VendorStyle("planmed", "Planmed Oy", "Planmed Clarity 2D", (3584, 2816), 14, "MONOCHROME1", "linear_exact",
                (600.0, 15500.0), padding_value=(1 << 14) - 1, modifier_codes="SCT", presentation_lut_shape=False),
    # A small-field detector with 10-bit data; several windows and no VOI LUT Function (default LINEAR).
    VendorStyle("ims", "I.M.S. GIOTTO S.p.A.", "Giotto Spot", (720, 560), 10, "MONOCHROME2", "windows",
                (30.0, 900.0), voi_lut_function=False, magnification_factor=False),
)
ALL_VENDORS = VENDORS + EXTRA_VENDORS
VENDOR_BY_KEY = {v.key: v for v in ALL_VENDORS}

BIOPSY_TOOLS = ("needle", "clip", "ring")
MARKER_SHAPES = ("ring", "cross", "coil", "spiral", "wire", "cylinder", "clip", "bb", "needle")
DISTRACTORS = ("calcs", "popcorn", "rim_calc", "vessel", "calc_vessel", "skin_fold", "text")
STANDARD_VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))

Range = tuple[float, float]
Mixture = tuple[tuple[str, float], ...]  # (name, weight) pairs; weights need not sum to 1


@dataclass(frozen=True)
class SynthParams:
    """Every distribution the drawing uses, as one frozen value (``dataclasses.replace`` makes variants).

    ``style`` "classic" runs the original drawing code, which reads only the ``tool_*`` fields and
    ``noise_sigma``; "hard" runs the wide one, which reads the rest. Ranges are uniform unless
    said otherwise; fractions are of the image's long side; intensities are display units where
    0 is the window's bottom and 1 its top (metal lies above 1).
    """

    name: str
    style: str = "hard"
    vendors: tuple[str, ...] = tuple(v.key for v in VENDORS)
    noise_sigma: Range = (0.012, 0.012)
    # --- classic tools
    tool_stroke: float = 0.016
    tool_clip_size: Range = (0.07, 0.10)
    tool_ring_radius: Range = (0.03, 0.045)
    tool_edge_rate: float = 0.3
    # --- planning (hard)
    marker_shapes: Mixture = ()
    marker_count: tuple[float, float, float] = (1.0, 0.0, 0.0)  # weights of 1, 2, 3 markers
    side_miss_rate: float = 0.0  # a view of the marked side whose field misses the marker (label 0)
    contact_ml_rate: float = 0.0  # contact views taken ML instead of MLO
    mag_views: Mixture = (("CC", 1.0), ("ML", 1.0))
    # --- markers (hard)
    marker_size: Range = (0.01, 0.03)
    marker_size_log: bool = True  # log-uniform (True) or uniform marker sizes
    marker_min_px: float = 4.0  # no marker smaller than this on tiny test images
    marker_stroke: Range = (0.12, 0.25)  # stroke width as a fraction of the marker's size (>= 1.2 px)
    metal_rate: float = 0.5  # saturated metal; otherwise a faint step over the background
    metal_level: Range = (1.05, 1.4)
    faint_contrast: Range = (0.06, 0.3)
    contrast_over_noise: float = 3.0  # a faint marker's step is at least this many noise sigmas
    placement: Mixture = (("breast", 0.6), ("dense", 0.25), ("edge", 0.15))
    edge_offset: Range = (-0.45, 0.3)  # edge markers: centre's distance inside the border / marker extent
    min_visible_frac: float = 0.2  # a cut marker keeps at least this share of its pixels inside the image
    # --- breast and tissue (hard)
    breast_depth: Range = (0.45, 0.95)  # nipple's reach across the image width
    breast_half_height: Range = (0.28, 0.5)
    density: Range = (0.1, 0.9)  # glandular fraction: fatty .. dense
    gland_contrast: Range = (0.28, 0.42)
    texture_cells: Range = (10.0, 18.0)  # coarse texture cells across the long side (contact views)
    pectoral_boost: Range = (0.08, 0.18)
    # --- magnification views (hard)
    mag_zoom: Range = (1.6, 2.4)  # texture magnification against a contact view
    mag_paddle: Mixture = (("rect", 0.6), ("round", 0.15), ("none", 0.25))
    mag_air_rate: float = 0.5  # the skin line (air) is in the field
    line_artefact_rate: tuple[float, float] = (0.3, 0.05)  # (mag views, contact views): detector lines
    grid_rate: tuple[float, float] = (0.2, 0.05)  # (mag, contact): faint periodic grid lines
    # --- vendor look (hard)
    heel: Range = (0.0, 0.12)  # brightness falloff across the image (heel effect, uneven gain)
    gain: Range = (0.92, 1.08)
    offset: Range = (-0.04, 0.04)
    gamma: Range = (0.85, 1.2)
    # --- distractors (hard), on every image whatever its label
    distractor_rates: Mixture = (("calcs", 0.5), ("popcorn", 0.15), ("rim_calc", 0.0), ("vessel", 0.6),
                                 ("calc_vessel", 0.15), ("skin_fold", 0.2), ("text", 0.5))
    mag_calcs_rate: float = 0.7  # magnification views are taken for calcifications
    calc_contrast: Range = (0.12, 0.5)
    popcorn_contrast: Range = (0.3, 0.7)
    text_saturated_rate: float = 0.7  # burned-in text at the very top of the range (else bright grey)
    # --- headers (every style): Estimated Radiographic Magnification Factor by view, and header slips
    mag_factor_mag: Range = (1.8, 1.8)  # written on magnification views (by vendors that write it)
    mag_factor_contact: Range = (1.07, 1.07)  # contact views: > 1 too (the breast lies above the detector)
    header_slip_rate: float = 0.0  # a mag view whose header says nothing of it (no modifier, a contact factor)

    def __post_init__(self) -> None:
        if self.style not in ("classic", "hard"):
            raise ValueError(f"SynthParams.style must be 'classic' or 'hard', not {self.style!r}")
        unknown = {k for k in self.vendors if k not in VENDOR_BY_KEY}
        unknown |= {s for s, _ in self.marker_shapes if s not in MARKER_SHAPES}
        unknown |= {d for d, _ in self.distractor_rates if d not in DISTRACTORS}
        if unknown:
            raise ValueError(f"SynthParams {self.name!r}: unknown names {sorted(unknown)}")


CLASSIC = SynthParams(name="classic", style="classic")

STANDARD = SynthParams(
    name="standard",
    vendors=("hologic", "ge", "fuji", "siemens", "planmed"),
    noise_sigma=(0.006, 0.02),
    marker_shapes=(("clip", 0.2), ("ring", 0.12), ("cross", 0.1), ("coil", 0.12), ("spiral", 0.06),
                   ("cylinder", 0.14), ("bb", 0.1), ("wire", 0.08), ("needle", 0.08)),
    marker_count=(0.6, 0.3, 0.1),
    side_miss_rate=0.08,
    contact_ml_rate=0.1,
    mag_views=(("CC", 0.5), ("ML", 0.4), ("MLO", 0.1)),
    marker_size=(0.009, 0.035), marker_size_log=True,
    marker_stroke=(0.12, 0.25),
    metal_rate=0.55, metal_level=(1.05, 1.4), faint_contrast=(0.06, 0.3),
    placement=(("breast", 0.55), ("dense", 0.3), ("edge", 0.15)),
    breast_depth=(0.45, 0.95), breast_half_height=(0.28, 0.5), density=(0.1, 0.9),
    mag_zoom=(1.6, 2.4), mag_paddle=(("rect", 0.6), ("round", 0.1), ("none", 0.3)), mag_air_rate=0.5,
    line_artefact_rate=(0.3, 0.05), grid_rate=(0.2, 0.05),
    heel=(0.0, 0.12), gain=(0.92, 1.08), offset=(-0.04, 0.04), gamma=(0.85, 1.2),
    distractor_rates=(("calcs", 0.5), ("popcorn", 0.15), ("rim_calc", 0.0), ("vessel", 0.6),
                      ("calc_vessel", 0.15), ("skin_fold", 0.2), ("text", 0.5)),
)

SHIFTED = SynthParams(
    name="shifted",
    vendors=tuple(v.key for v in ALL_VENDORS),
    noise_sigma=(0.01, 0.03),
    marker_shapes=(("ring", 0.2), ("cross", 0.15), ("coil", 0.12), ("spiral", 0.04), ("wire", 0.15),
                   ("cylinder", 0.15), ("clip", 0.08), ("bb", 0.07), ("needle", 0.04)),
    marker_count=(0.5, 0.35, 0.15),
    side_miss_rate=0.12,
    contact_ml_rate=0.2,
    mag_views=(("CC", 0.4), ("ML", 0.3), ("MLO", 0.3)),
    marker_size=(0.008, 0.025), marker_size_log=False,
    marker_stroke=(0.18, 0.35),
    metal_rate=0.35, metal_level=(1.0, 1.25), faint_contrast=(0.05, 0.35),
    placement=(("breast", 0.45), ("dense", 0.25), ("edge", 0.30)),
    breast_depth=(0.35, 1.05), breast_half_height=(0.25, 0.58), density=(0.05, 0.95),
    gland_contrast=(0.22, 0.48), texture_cells=(7.0, 24.0), pectoral_boost=(0.04, 0.22),
    mag_zoom=(1.4, 3.0), mag_paddle=(("rect", 0.35), ("round", 0.15), ("none", 0.5)), mag_air_rate=0.35,
    line_artefact_rate=(0.5, 0.15), grid_rate=(0.3, 0.1),
    heel=(0.0, 0.2), gain=(0.85, 1.12), offset=(-0.06, 0.06), gamma=(0.7, 1.4),
    distractor_rates=(("calcs", 0.6), ("popcorn", 0.2), ("rim_calc", 0.15), ("vessel", 0.5),
                      ("calc_vessel", 0.25), ("skin_fold", 0.35), ("text", 0.7)),
    mag_calcs_rate=0.6, calc_contrast=(0.1, 0.6), popcorn_contrast=(0.25, 0.8), text_saturated_rate=0.5,
    mag_factor_mag=(1.3, 2.0), mag_factor_contact=(1.0, 1.2), header_slip_rate=0.2,
)

FAMILIES: dict[str, SynthParams] = {p.name: p for p in (CLASSIC, STANDARD, SHIFTED)}


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


@dataclass
class Rendering:
    """One drawn frame: display intensity (0..1, metal above), air, the marker pixels, the attributes."""

    intensity: np.ndarray
    air: np.ndarray  # outside the breast (where a vendor writes its Pixel Padding Value)
    marker: np.ndarray  # bool: marker pixels (coverage >= 1/2) inside the image
    attributes: dict[str, object]  # DIFFICULTY_COLUMNS values (family, vendor, view, detector come later)
    burned_in: bool = False  # text drawn into the pixels (Burned In Annotation YES)


def family_params(family: str | SynthParams) -> SynthParams:
    """A family by name (``FAMILIES``), or the SynthParams given."""
    if isinstance(family, SynthParams):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown synthetic family {family!r}; choose from {sorted(FAMILIES)}") from None


def _salt(name: str) -> int:
    """A stable integer per family name: the hard families' random streams differ from classic's and each other's."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


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
    family: str | SynthParams = "classic",
) -> Path:
    """Write ``n_studies`` synthetic mammography studies under ``out_dir``; return ground_truth.csv's path.

    ``family`` names the distributions drawn (``FAMILIES``: "classic", "standard", "shifted") or is
    a ``SynthParams``. The default is still "classic", the original easy generator that the demo
    and the existing tests were written against; benchmarks of what the model learns should use
    "standard" / "shifted". ``vendors`` defaults to the family's.

    ``size`` is the long side in pixels of every image (each vendor keeps its aspect);
    None draws each vendor's realistic detector size (slow: for the demo). Ground truth
    has one row per frame: ``file`` (relative to out_dir), UIDs, a hash of the fake
    PatientID, the labels (0/1) and the manufacturer, then ``DIFFICULTY_COLUMNS``.
    """
    params = family_params(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen_vendors = [VENDOR_BY_KEY[k] for k in (vendors or params.vendors)]
    cycle = tuple(c for c in COMPRESSION_CYCLE if c in set(compressions)) if compressions else COMPRESSION_CYCLE
    if not cycle:
        cycle = tuple(compressions or ("none",))
    for name in cycle:
        if name not in TRANSFER_SYNTAXES:
            raise ValueError(f"unknown compression {name!r}; choose from {sorted(TRANSFER_SYNTAXES)}")
    plans = plan_cohort(n_studies, seed, chosen_vendors, cycle, images_per_study, biopsy_rate, mag_rate,
                        for_processing_every, multiframe, params)
    gt_path = out / GROUND_TRUTH_FILE
    with open(gt_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=GROUND_TRUTH_COLUMNS)
        writer.writeheader()
        for study in plans:
            for row in _write_study(out, study, seed, size, params):
                writer.writerow(row)
    return gt_path


def read_ground_truth(path: str | Path) -> list[dict[str, str]]:
    """ground_truth.csv as a list of rows (labels stay the strings "0"/"1")."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def patient_id_hash(patient_id: str) -> str:
    """An unkeyed grouping hash of the fake PatientID (ground truth only; the importer uses a keyed one)."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def image_rng(seed: int, study_index: int, image_index: int, params: SynthParams) -> np.random.Generator:
    """The random stream one image is drawn from (classic's is unsalted, as it always was)."""
    if params.style == "classic":
        return np.random.default_rng([seed, study_index, image_index])
    return np.random.default_rng([seed, study_index, image_index, _salt(params.name)])


# --------------------------------------------------------------------------------------------
# Planning: which studies, images, labels, header styles (cheap; drawing comes later)


def plan_cohort(n_studies: int, seed: int, vendors: Sequence[VendorStyle], compressions: Sequence[str],
                images_per_study: tuple[int, int], biopsy_rate: float, mag_rate: float,
                for_processing_every: int, multiframe: bool, params: SynthParams = CLASSIC) -> list[StudyPlan]:
    # Every draw the hard families add is behind ``hard``: classic's random stream is unchanged.
    hard = params.style == "hard"
    rng = np.random.default_rng([seed, 20240, _salt(params.name)] if hard else [seed, 20240])
    kinds: Callable[[np.random.Generator, bool], tuple[str, ...]] = (
        (lambda r, needle_ok: _marker_kinds(r, params, needle_ok)) if hard else _tool_kinds)
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
        tool_kinds = kinds(rng, True)
        has_mag = rng.random() < mag_rate
        for j in range(n_images):
            laterality, view = views[j % len(views)]
            mag = has_mag and j == n_images - 1
            if mag:
                view = _pick(rng, params.mag_views) if hard else str(rng.choice(["CC", "ML"]))
            elif hard and view == "MLO" and rng.random() < params.contact_ml_rate:
                view = "ML"  # a diagnostic ML contact view: ML alone must not mean "magnified"
            tools = tool_kinds if laterality == tool_side else ()
            if tools and j % 2 == 1:
                tools = kinds(rng, False)  # the other view of a side shows clips, not needles
            if hard and tools and rng.random() < params.side_miss_rate:
                tools = ()  # ... unless this view's field misses the marker: then the image is negative
            compression = compressions[image_counter % len(compressions)]
            for_processing = for_processing_every > 0 and image_counter % for_processing_every == 5
            study.images.append(ImagePlan(laterality, view, mag, tools, compression, for_processing))
            image_counter += 1
        if index == multiframe_study:
            first = study.images[0]
            first.frames, first.compression, first.for_processing = 2, "none", False
            if not first.tools:
                first.laterality = tool_side or first.laterality
                first.tools = kinds(rng, True) if hard else ("needle",)
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


def _marker_kinds(rng: np.random.Generator, params: SynthParams, needle_ok: bool) -> tuple[str, ...]:
    """1-3 marker shapes from the family's mixture (at most one needle, and none when not allowed)."""
    count = 1 + int(rng.choice(3, p=np.asarray(params.marker_count) / sum(params.marker_count)))
    shapes: list[str] = []
    for _ in range(count):
        allowed = tuple((s, w) for s, w in params.marker_shapes
                        if s != "needle" or (needle_ok and "needle" not in shapes))
        shapes.append(_pick(rng, allowed))
    return tuple(shapes)


def _pick(rng: np.random.Generator, mixture: Mixture) -> str:
    names = [name for name, _ in mixture]
    weights = np.asarray([w for _, w in mixture], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])


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


def render_image(rng: np.random.Generator, rows: int, cols: int, plan: ImagePlan,
                 params: SynthParams = CLASSIC) -> Rendering:
    """Draw one frame of ``plan`` with the family's distributions."""
    if params.style == "classic":
        return _render_classic(rng, rows, cols, plan, params)
    return _render_hard(rng, rows, cols, plan, params)


def draw_image(rng: np.random.Generator, rows: int, cols: int, plan: ImagePlan) -> tuple[np.ndarray, np.ndarray]:
    """One classic synthetic image: (display intensity float32 0..~1.3, mask of air outside the breast)."""
    drawn = _render_classic(rng, rows, cols, plan, CLASSIC)
    return drawn.intensity, drawn.air


def _render_classic(rng, rows, cols, plan: ImagePlan, params: SynthParams) -> Rendering:
    if plan.mag_view:
        intensity, air = _magnification_field(rng, rows, cols, plan.laterality)
    else:
        intensity, air = _contact_view(rng, rows, cols, plan.laterality, plan.view)
    metal = np.zeros((rows, cols), dtype=bool)
    if plan.tools:
        metal = _draw_tools(rng, rows, cols, plan.tools, air, params)
        intensity = np.where(metal, np.float32(METAL), intensity)
        air &= ~metal
    intensity += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(params.noise_sigma[0])
    attributes = {"marker_count": len(plan.tools), "marker_shapes": ";".join(plan.tools),
                  "marker_metal": int(bool(plan.tools)), "marker_visible_px": int(metal.sum()),
                  "noise_sigma": params.noise_sigma[0]}
    return Rendering(intensity, air, metal, attributes)
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


def _draw_tools(rng, rows, cols, tools, air, params: SynthParams = CLASSIC) -> np.ndarray:
    """Classic metal: needles, clips and ring markers, drawn at full resolution."""
    long_side = max(rows, cols)
    mask = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(mask)
    width = max(2, round(params.tool_stroke * long_side))  # thick enough to survive resizing to 64 px
    inside = np.argwhere(~air[:: max(1, rows // 64), :: max(1, cols // 64)])
    for kind in tools:
        near_edge = rng.random() < params.tool_edge_rate  # the hard cases: markers at the image edge
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
            size = rng.uniform(*params.tool_clip_size) * long_side
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
            radius = rng.uniform(*params.tool_ring_radius) * long_side
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=255, width=width)
    return np.asarray(mask) > 0


# --------------------------------------------------------------------------------------------
# Drawing, hard families: small, faint, cut markers among things that look like them

SUPERSAMPLE = 4  # markers are drawn 4x finer and averaged down: partial-volume edges, thin strokes
AIR_LEVEL = 0.04
Primitive = tuple[str, list[tuple[float, float]], float]  # ("line", points, width) | ("polygon" ...) | ("disc", [centre], radius)


def _render_hard(rng: np.random.Generator, rows: int, cols: int, plan: ImagePlan, p: SynthParams) -> Rendering:
    noise = _uniform(rng, p.noise_sigma)
    artefacts: list[str] = []
    if plan.mag_view:
        intensity, air, density = _hard_mag_field(rng, rows, cols, plan, p, artefacts)
    else:
        intensity, air, density = _hard_contact_view(rng, rows, cols, plan, p)
    present = _distractors_present(rng, plan, p)
    distractors = _draw_distractors(rng, intensity, air, present, p)
    intensity = _vendor_look(rng, intensity, p)
    intensity, coverage, markers = _draw_markers(rng, intensity, air, plan, p, noise)
    air &= coverage <= 0  # a marker over air shows (no padding value over it)
    _detector_artefacts(rng, intensity, plan, p, artefacts)
    # Quantum noise: a little stronger where the detector saw less dose (bright, dense regions).
    scale = np.float32(noise) * (np.float32(0.5) + np.float32(0.6) * np.clip(intensity, 0.0, 1.0))
    intensity += rng.standard_normal((rows, cols), dtype=np.float32) * scale
    burned_in = "text" in present
    if burned_in:
        text = _burn_in_text(rng, intensity, plan, p)
        air &= ~text
        distractors.append("text")
    marker = coverage >= 0.5
    attributes: dict[str, object] = {
        "marker_count": len(markers),
        "marker_shapes": ";".join(m["shape"] for m in markers),
        "marker_size_frac": round(max((m["size_frac"] for m in markers), default=0.0), 4) if markers else "",
        "marker_contrast": round(max((m["contrast"] for m in markers), default=0.0), 4) if markers else "",
        "marker_metal": int(any(m["metal"] for m in markers)),
        "marker_cut_by_edge": int(any(m["cut"] for m in markers)),
        "marker_in_dense": int(any(m["dense"] for m in markers)),
        "marker_visible_px": int(marker.sum()),
        "distractors": ";".join(sorted(distractors)),
        "artefacts": ";".join(sorted(set(artefacts))),
        "breast_density": round(density, 3),
        "noise_sigma": round(noise, 4),
    }
    return Rendering(intensity, air, marker, attributes, burned_in)


def _tissue(rng, rows: int, cols: int, thickness: np.ndarray, density: float, cells: float,
            p: SynthParams) -> np.ndarray:
    """Fat and glandular tissue: a soft threshold of cloud noise keeps ``density`` of it glandular."""
    long_side = max(rows, cols)
    coarse = _smooth_noise(rng, rows, cols, cell=long_side / max(cells, 1.5))
    sample = coarse[::8, ::8]
    threshold = np.float32(np.quantile(sample, 1.0 - density))
    spread = np.float32(0.6 * float(sample.std()) + 1e-6)
    gland = 1.0 / (1.0 + np.exp(np.clip(-(coarse - threshold) / spread, -30.0, 30.0)))
    fine = _smooth_noise(rng, rows, cols, cell=max(1.5, long_side / (max(cells, 1.5) * 6.0)), octaves=2)
    strands = _strands(rng, rows, cols, cell=max(2.0, long_side / (max(cells, 1.5) * 4.0)))
    contrast = np.float32(_uniform(rng, p.gland_contrast))
    return (np.float32(0.20) + np.float32(0.22) * np.sqrt(thickness)
            + contrast * gland * thickness ** 0.3 * (np.float32(1.0) + np.float32(0.2) * strands)
            + np.float32(0.04) * fine * np.sqrt(thickness)).astype(np.float32)


def _strands(rng, rows: int, cols: int, cell: float) -> np.ndarray:
    """Fibrous strands: noise stretched along the chest wall-nipple axis (the image's width)."""
    grid = rng.standard_normal((max(2, int(rows / cell) + 2), max(2, int(cols / (cell * 3.5)) + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((cols, rows), Image.Resampling.BICUBIC),
                      dtype=np.float32)


def _hard_contact_view(rng, rows: int, cols: int, plan: ImagePlan, p: SynthParams):
    """A contact view: small or large (even beyond the image), fatty or dense breast; uneven skin line."""
    u, v = _chest_wall_distance(rows, cols, plan.laterality)
    depth = np.float32(_uniform(rng, p.breast_depth))
    half_height = np.float32(_uniform(rng, p.breast_half_height) * (1.0 if plan.view == "CC" else 1.15))
    centre = np.float32(rng.uniform(0.42, 0.58) + (0.0 if plan.view == "CC" else 0.04))
    uu, vv = u / depth, (v - centre) / half_height
    r2 = uu ** 2 + vv ** 2
    wobble, lobes, phase = rng.uniform(0.0, 0.06), int(rng.integers(2, 5)), rng.uniform(0, 2 * math.pi)
    r2 = r2 * (np.float32(1.0) + np.float32(wobble) * np.sin(lobes * np.arctan2(vv, uu) + np.float32(phase)))
    inside = r2 < 1.0
    thickness = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)).astype(np.float32)
    density = _uniform(rng, p.density)
    tissue = _tissue(rng, rows, cols, thickness, density, _uniform(rng, p.texture_cells), p)
    if plan.view == "MLO":
        reach = np.float32(rng.uniform(0.2, 0.42))
        pectoral = u < reach * (1.0 - v / np.float32(rng.uniform(0.4, 0.65)))
        tissue = np.where(pectoral & inside, tissue + np.float32(_uniform(rng, p.pectoral_boost)), tissue)
    intensity = np.where(inside, tissue, np.float32(AIR_LEVEL)).astype(np.float32)
    return intensity, ~inside, density


def _hard_mag_field(rng, rows: int, cols: int, plan: ImagePlan, p: SynthParams, artefacts: list[str]):
    """A magnification view: zoomed texture; maybe the skin line, a rectangular or round paddle's edge, or neither."""
    u, v = _chest_wall_distance(rows, cols, plan.laterality)
    zoom = _uniform(rng, p.mag_zoom)
    density = _uniform(rng, p.density)
    air = np.zeros((rows, cols), dtype=bool)
    thickness = np.ones((rows, cols), dtype=np.float32)
    aspect = np.float32(rows / cols)
    if rng.random() < p.mag_air_rate:
        # The skin line crosses the field far from the chest wall: an arc of a large circle.
        radius, reach, cy = rng.uniform(0.6, 1.2), rng.uniform(0.55, 0.95), rng.uniform(-0.2, 1.2)
        r = np.sqrt((u + np.float32(radius - reach)) ** 2 + ((v - np.float32(cy)) * aspect) ** 2) / np.float32(radius)
        air = np.broadcast_to(r > 1.0, (rows, cols)).copy()
        thickness = np.broadcast_to(np.sqrt(np.clip((1.0 - r) / 0.15, 0.0, 1.0)), (rows, cols)).astype(np.float32)
        artefacts.append("air")
    intensity = _tissue(rng, rows, cols, thickness, density, _uniform(rng, p.texture_cells) / zoom, p)
    paddle = _pick(rng, p.mag_paddle)
    boost, rim_level = np.float32(rng.uniform(0.08, 0.2)), np.float32(rng.uniform(0.55, 0.9))
    rim = np.float32(max(0.004, rng.uniform(1.5, 4.0) / max(rows, cols)))
    if paddle == "rect":
        top, bottom, reach = rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0), rng.uniform(0.55, 0.9)
        under = (v > top) & (v < bottom) & (u < reach)
        edge = under & ((np.abs(v - top) < rim) | (np.abs(v - bottom) < rim) | (np.abs(u - reach) < rim))
    elif paddle == "round":
        cu, cv, radius = rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.5)
        d = np.sqrt((u - np.float32(cu)) ** 2 + ((v - np.float32(cv)) * aspect) ** 2)
        under, edge = d < radius, np.abs(d - np.float32(radius)) < rim
    if paddle != "none":
        intensity = np.where(under, intensity, intensity + boost)  # thicker tissue outside the paddle
        intensity = np.where(edge, rim_level, intensity)
        artefacts.append(f"paddle_{paddle}")
    intensity = np.where(air, np.float32(AIR_LEVEL), intensity).astype(np.float32)
    return intensity, air, density


def _vendor_look(rng, intensity: np.ndarray, p: SynthParams) -> np.ndarray:
    """A vendor's processing: uneven gain (heel effect) along one axis, gain, offset and gamma."""
    rows, cols = intensity.shape
    heel = _uniform(rng, p.heel)
    ramp = (np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None] if rng.random() < 0.5
            else np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :])
    if rng.random() < 0.5:
        ramp = ramp[::-1] if ramp.shape[0] > 1 else ramp[:, ::-1]
    gain, offset, gamma = _uniform(rng, p.gain), _uniform(rng, p.offset), _uniform(rng, p.gamma)
    out = intensity * (np.float32(gain) * (np.float32(1.0) - np.float32(heel) * ramp)) + np.float32(offset)
    return np.power(np.clip(out, 0.0, None), np.float32(gamma)).astype(np.float32)


# --- distractors: on negatives and positives alike


def _distractors_present(rng, plan: ImagePlan, p: SynthParams) -> set[str]:
    rates = dict(p.distractor_rates)
    if plan.mag_view:
        rates["calcs"] = max(rates.get("calcs", 0.0), p.mag_calcs_rate)
    # One draw per kind in a fixed order, whatever the rates: the stream stays aligned across families.
    return {kind for kind in DISTRACTORS if rng.random() < rates.get(kind, 0.0)}


def _inside_points(air: np.ndarray, step: int) -> np.ndarray:
    return np.argwhere(~air[::step, ::step]) * step


def _draw_distractors(rng, intensity: np.ndarray, air: np.ndarray, present: set[str], p: SynthParams) -> list[str]:
    """Calcifications, vessels and skin folds inside the breast (in place); the kinds drawn."""
    rows, cols = intensity.shape
    long_side = max(rows, cols)
    points = _inside_points(air, max(1, min(rows, cols) // 128))
    if len(points) == 0:
        return []
    drawn: list[str] = []

    def somewhere() -> tuple[float, float]:
        y, x = points[int(rng.integers(0, len(points)))]
        return float(y), float(x)

    if "calcs" in present:
        for _ in range(int(rng.integers(1, 3))):  # one or two clusters of small bright dots
            cy, cx = somewhere()
            spread = long_side * rng.uniform(0.004, 0.025)
            n = int(rng.integers(3, 21))
            centres = [(cy + rng.normal(0, spread / 2), cx + rng.normal(0, spread / 2)) for _ in range(n)]
            radii = [max(0.6, long_side * rng.uniform(0.0007, 0.0025)) for _ in range(n)]
            for centre, radius in zip(centres, radii):
                _add_discs(intensity, [centre], [radius], _uniform(rng, p.calc_contrast))
        drawn.append("calcs")
    if "popcorn" in present:
        for _ in range(int(rng.integers(1, 3))):  # coarse benign calcifications, marker-sized and bright
            cy, cx = somewhere()
            size = long_side * rng.uniform(0.005, 0.016)
            n = int(rng.integers(3, 7))
            centres = [(cy + rng.uniform(-0.35, 0.35) * size, cx + rng.uniform(-0.35, 0.35) * size) for _ in range(n)]
            radii = [max(0.8, size * rng.uniform(0.15, 0.35)) for _ in range(n)]
            _add_discs(intensity, centres, radii, _uniform(rng, p.popcorn_contrast))
        drawn.append("popcorn")
    if "rim_calc" in present:
        for _ in range(int(rng.integers(1, 3))):  # eggshell calcification: an irregular, broken ring
            cy, cx = somewhere()
            radius = max(2.5, long_side * rng.uniform(0.003, 0.012))
            gap_at, gap = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.6)
            t = np.linspace(gap_at + gap, gap_at + 2 * math.pi, 28)
            wobble = 1.0 + 0.15 * np.sin(3 * t + rng.uniform(0, 6.3))
            pts = [(float(radius * w * math.cos(a)), float(radius * w * math.sin(a))) for a, w in zip(t, wobble)]
            width = max(1.0, radius * rng.uniform(0.2, 0.45))
            patch, half = _coverage_patch([("line", pts, width)])
            _add_patch(intensity, patch, half, cy, cx, _uniform(rng, p.calc_contrast))
        drawn.append("rim_calc")
    inside = (~air).astype(np.float32)
    if "vessel" in present:
        canvas = Image.new("L", (cols, rows), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 5))):
            width = max(1, round(long_side * rng.uniform(0.0015, 0.005)))
            draw.line(_meander(rng, somewhere(), long_side, cols), fill=255, width=width, joint="curve")
        canvas = canvas.filter(ImageFilter.GaussianBlur(max(0.6, long_side / 1200)))
        intensity += np.asarray(canvas, dtype=np.float32) * np.float32(rng.uniform(0.03, 0.09) / 255) * inside
        drawn.append("vessel")
    if "calc_vessel" in present:
        # Calcified vessel wall: two parallel dashed bright lines ("tram tracks"), thin like a wire.
        canvas = Image.new("L", (cols, rows), 0)
        draw = ImageDraw.Draw(canvas)
        path = _meander(rng, somewhere(), long_side, cols, steps=10)
        gap = max(1.5, long_side * rng.uniform(0.002, 0.004))
        width = max(1, round(long_side * 0.0012))
        for (x0, y0), (x1, y1) in zip(path[:-1], path[1:]):
            if rng.random() < 0.35:
                continue  # the calcification is patchy
            nx, ny = -(y1 - y0), x1 - x0
            norm = math.hypot(nx, ny) or 1.0
            for sign in (-1, 1):
                ox, oy = sign * gap * nx / norm, sign * gap * ny / norm
                draw.line([(x0 + ox, y0 + oy), (x1 + ox, y1 + oy)], fill=255, width=width)
        intensity += (np.asarray(canvas, dtype=np.float32) * np.float32(_uniform(rng, p.calc_contrast) / 255)
                      * inside)
        drawn.append("calc_vessel")
    if "skin_fold" in present:
        canvas = Image.new("L", (cols, rows), 0)
        draw = ImageDraw.Draw(canvas)
        cy, cx = somewhere()
        radius = long_side * rng.uniform(0.25, 0.8)
        start = rng.uniform(0, 360)
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        width = max(2, round(long_side * rng.uniform(0.004, 0.018)))
        draw.arc(box, start, start + rng.uniform(25, 70), fill=255, width=width)
        canvas = canvas.filter(ImageFilter.GaussianBlur(width / 2))
        intensity += np.asarray(canvas, dtype=np.float32) * np.float32(rng.uniform(0.03, 0.1) / 255) * inside
        drawn.append("skin_fold")
    return drawn


def _meander(rng, start: tuple[float, float], long_side: int, cols: int, steps: int = 14) -> list[tuple[float, float]]:
    """A vessel-like path (x, y points) from ``start``, winding away from the nearer side edge."""
    y, x = start
    heading = 0.0 if x < cols / 2 else math.pi
    heading += rng.uniform(-0.8, 0.8)
    pts = [(x, y)]
    for _ in range(steps):
        heading += rng.normal(0, 0.35)
        step = long_side * rng.uniform(0.02, 0.05)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        pts.append((x, y))
    return pts


def _add_discs(intensity: np.ndarray, centres, radii, delta: float) -> None:
    """Add ``delta`` x (anti-aliased union of discs) in place: calcifications."""
    rows, cols = intensity.shape
    reach = max(radii) + 1.5
    y0 = max(0, int(math.floor(min(c[0] for c in centres) - reach)))
    y1 = min(rows, int(math.ceil(max(c[0] for c in centres) + reach)) + 1)
    x0 = max(0, int(math.floor(min(c[1] for c in centres) - reach)))
    x1 = min(cols, int(math.ceil(max(c[1] for c in centres) + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5)
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5)
    cover = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    for (cy, cx), r in zip(centres, radii):
        d = np.sqrt((yy - np.float32(cy)) ** 2 + (xx - np.float32(cx)) ** 2)
        np.maximum(cover, np.clip(np.float32(r + 0.5) - d, 0.0, 1.0), out=cover)
    intensity[y0:y1, x0:x1] += np.float32(delta) * cover


def _coverage_patch(prims: Sequence[Primitive]) -> tuple[np.ndarray, int]:
    """Draw primitives (local coordinates around 0, pixels) supersampled; (coverage 0..1, half size)."""
    reach = 1.0
    for kind, points, width in prims:
        pad = width if kind == "disc" else width / 2
        reach = max(reach, max(max(abs(x), abs(y)) for x, y in points) + pad)
    half = int(math.ceil(reach + 2))
    n, ss = 2 * half, SUPERSAMPLE
    image = Image.new("L", (n * ss, n * ss), 0)
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return (x + half) * ss, (y + half) * ss

    for kind, points, width in prims:
        if kind == "line":
            draw.line([at(x, y) for x, y in points], fill=255, width=max(1, round(width * ss)), joint="curve")
        elif kind == "polygon":
            draw.polygon([at(x, y) for x, y in points], fill=255)
        else:  # disc: one centre, ``width`` is its radius
            (cx, cy), = points
            x0, y0 = at(cx - width, cy - width)
            x1, y1 = at(cx + width, cy + width)
            draw.ellipse([x0, y0, x1, y1], fill=255)
    cover = np.asarray(image, dtype=np.float32).reshape(n, ss, n, ss).mean(axis=(1, 3)) / np.float32(255)
    return cover, half


def _patch_window(shape: tuple[int, int], n: int, half: int, cy: float, cx: float):
    """(image slices, patch slices) where a patch of side n centred at (cy, cx) overlaps the image; None if not."""
    rows, cols = shape
    top, left = int(round(cy)) - half, int(round(cx)) - half
    y0, y1, x0, x1 = max(0, top), min(rows, top + n), max(0, left), min(cols, left + n)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def _add_patch(intensity: np.ndarray, patch: np.ndarray, half: int, cy: float, cx: float, delta: float) -> None:
    window = _patch_window(intensity.shape, patch.shape[0], half, cy, cx)
    if window is not None:
        image_part, patch_part = window
        intensity[image_part] += np.float32(delta) * patch[patch_part]


# --- markers


def _rotate(prims: list[Primitive], angle: float) -> list[Primitive]:
    c, s = math.cos(angle), math.sin(angle)
    return [(kind, [(x * c - y * s, x * s + y * c) for x, y in points], width) for kind, points, width in prims]


def _marker_primitives(rng, kind: str, size: float, stroke: float) -> list[Primitive]:
    """One marker's strokes and blobs, ``size`` pixels across (before rotation)."""
    half = size / 2
    if kind == "ring":  # skin / scar ring marker, seen slightly obliquely
        b = half * rng.uniform(0.7, 1.0)
        t = np.linspace(0, 2 * math.pi, 41)
        return [("line", [(half * math.cos(a), b * math.sin(a)) for a in t], stroke)]
    if kind == "cross":  # cross / "X" shaped clip
        other, phi = size * rng.uniform(0.6, 1.0) / 2, math.radians(rng.uniform(55, 90))
        return [("line", [(-half, 0.0), (half, 0.0)], stroke),
                ("line", [(-other * math.cos(phi), -other * math.sin(phi)),
                          (other * math.cos(phi), other * math.sin(phi))], stroke)]
    if kind == "coil":  # coil / helix seen from the side: loops along an axis
        turns, radius = rng.uniform(2.5, 6.0), size * rng.uniform(0.12, 0.22)
        t = np.linspace(0, 1, int(turns * 12) + 2)
        return [("line", [(-half + size * a + 0.5 * radius * math.cos(2 * math.pi * turns * a),
                           radius * math.sin(2 * math.pi * turns * a)) for a in t], max(1.2, 0.8 * stroke))]
    if kind == "spiral":  # flat spiral coil seen end-on
        turns = rng.uniform(1.5, 3.0)
        t = np.linspace(0, 1, int(turns * 16) + 2)
        return [("line", [(half * (0.15 + 0.85 * a) * math.cos(2 * math.pi * turns * a),
                           half * (0.15 + 0.85 * a) * math.sin(2 * math.pi * turns * a)) for a in t],
                 max(1.2, 0.8 * stroke))]
    if kind == "wire":  # localisation wire / ribbon: long, thin, gently bent, hooked at one end
        length, bend = size * rng.uniform(2.0, 5.0), rng.uniform(-0.15, 0.15)
        t = np.linspace(0, 1, 16)
        pts = [(-length / 2 + length * a, bend * length * 4 * (a * a - a)) for a in t]
        hook = 1 if rng.random() < 0.5 else -1
        pts.append((pts[-1][0] - 0.12 * length, pts[-1][1] + hook * 0.1 * length))
        return [("line", pts, max(1.2, 0.6 * stroke))]
    if kind == "cylinder":  # rod / cylinder marker: a filled bar with rounded ends
        radius = size * rng.uniform(0.11, 0.2)
        return [("line", [(-half + radius, 0.0), (half - radius, 0.0)], 2 * radius),
                ("disc", [(-half + radius, 0.0)], radius), ("disc", [(half - radius, 0.0)], radius)]
    if kind == "clip":  # zig-zag ribbon clip
        n, amp = int(rng.integers(4, 7)), size * rng.uniform(0.12, 0.3)
        return [("line", [(-half + size * k / (n - 1), amp * (1 if k % 2 else -1)) for k in range(n)], stroke)]
    if kind == "bb":  # BB skin markers: one to four small metal spheres
        radius = max(0.8, size * rng.uniform(0.2, 0.35))
        centres = [(0.0, 0.0)] + [(rng.uniform(-size, size), rng.uniform(-size, size))
                                  for _ in range(int(rng.integers(0, 4)))]
        return [("disc", [c], radius) for c in centres]
    raise ValueError(f"unknown marker shape {kind!r}")


def _extent(prims: Sequence[Primitive]) -> float:
    """A marker's size: the diameter of the smallest circle about its centre that holds all of it."""
    return 2 * max(math.hypot(x, y) + (width if kind == "disc" else width / 2)
                   for kind, points, width in prims for x, y in points)


def _marker_size(rng, p: SynthParams, long_side: int) -> float:
    low, high = p.marker_size
    frac = math.exp(rng.uniform(math.log(low), math.log(high))) if p.marker_size_log else rng.uniform(low, high)
    return max(p.marker_min_px, frac * long_side)


def _draw_markers(rng, intensity: np.ndarray, air: np.ndarray, plan: ImagePlan, p: SynthParams, noise: float):
    """Markers (in their own coverage map); returns (intensity, coverage, one dict per marker)."""
    rows, cols = intensity.shape
    long_side = max(rows, cols)
    coverage = np.zeros((rows, cols), dtype=np.float32)
    if not plan.tools:
        return intensity, coverage, []
    step = max(1, min(rows, cols) // 128)
    points = _inside_points(air, step)
    if len(points) == 0:
        points = np.array([[rows // 2, cols // 2]])
    levels = intensity[points[:, 0], points[:, 1]]
    dense_level = float(np.quantile(levels, 0.75))
    dense_points = points[levels >= dense_level]
    edge_band = 2 * step + 1
    border_points = points[(points[:, 0] < edge_band) | (points[:, 0] >= rows - edge_band)
                           | (points[:, 1] < edge_band) | (points[:, 1] >= cols - edge_band)]
    markers = []
    for kind in plan.tools:
        size = _marker_size(rng, p, long_side)
        stroke = max(1.2, _uniform(rng, p.marker_stroke) * size)
        angle = rng.uniform(0, 2 * math.pi)
        mode = _pick(rng, p.placement)
        metal = rng.random() < (max(p.metal_rate, 0.8) if kind == "needle" else p.metal_rate)
        level = _uniform(rng, p.metal_level)
        faint = max(_uniform(rng, p.faint_contrast), p.contrast_over_noise * noise)
        if kind == "needle":
            cover, total, cut, extent = _needle(rng, rows, cols, points, dense_points, mode, size, stroke)
            window = ((slice(0, rows), slice(0, cols)), (slice(0, rows), slice(0, cols)))
        else:
            prims = _rotate(_marker_primitives(rng, kind, size, stroke), angle)
            patch, half = _coverage_patch(prims)
            total = int((patch >= 0.5).sum())
            extent = _extent(prims)
            window, cut = _place(rng, mode, patch, half, total, points, dense_points, border_points,
                                 (rows, cols), p)
            cover = patch[window[1]]
        image_part = window[0]
        before = intensity[image_part]
        if metal:
            target = np.maximum(np.float32(level), before + np.float32(0.1))
            after = before + cover * (target - before)
        else:
            after = before + cover * np.float32(faint)
        shown = cover >= 0.5
        background = float(np.median(before[shown])) if shown.any() else float(np.median(before))
        markers.append({"shape": kind, "size_frac": extent / long_side, "metal": metal, "cut": cut,
                        "contrast": float((after - before)[shown].mean()) if shown.any() else 0.0,
                        "dense": background >= dense_level})
        intensity[image_part] = after
        np.maximum(coverage[image_part], cover, out=coverage[image_part])
    return intensity, coverage, markers


def _place(rng, mode: str, patch: np.ndarray, half: int, total: int, points, dense_points, border_points,
           shape: tuple[int, int], p: SynthParams):
    """Choose a centre for the marker; ((image slices, patch slices), cut by the edge).

    Edge markers have their centre near, on or beyond the border; a placement is kept only if
    enough of the marker stays inside the image (``min_visible_frac``), so a positive image
    always shows marker pixels.
    """
    rows, cols = shape
    need = max(1, math.ceil(p.min_visible_frac * total))
    extent = patch.shape[0] - 4
    for attempt in range(16):
        if attempt >= 8:
            mode = "breast"
        pool = {"dense": dense_points, "edge": border_points}.get(mode, points)
        if len(pool) == 0:
            pool = points
        cy, cx = (float(c) for c in pool[int(rng.integers(0, len(pool)))])
        if mode == "edge":
            # Move the centre onto the nearest border, then in or out by a fraction of the extent.
            offset = _uniform(rng, p.edge_offset) * extent
            nearest = int(np.argmin([cy, rows - 1 - cy, cx, cols - 1 - cx]))
            cy, cx = [(offset, cx), (rows - 1 - offset, cx), (cy, offset), (cy, cols - 1 - offset)][nearest]
        window = _patch_window(shape, patch.shape[0], half, cy, cx)
        if window is not None and int((patch[window[1]] >= 0.5).sum()) >= need:
            return window, int((patch[window[1]] >= 0.5).sum()) < total
    window = _patch_window(shape, patch.shape[0], half, rows / 2, cols / 2)  # the centre always fits
    return window, int((patch[window[1]] >= 0.5).sum()) < total


def _needle(rng, rows: int, cols: int, points, dense_points, mode: str, size: float, stroke: float):
    """A biopsy needle from the top or bottom edge to a lesion, its hub at the edge (partly outside)."""
    pool = dense_points if mode == "dense" and len(dense_points) else points
    cy, cx = (float(c) for c in pool[int(rng.integers(0, len(pool)))])
    long_side = max(rows, cols)
    hub = max(3.0, size)
    margin = int(math.ceil(hub)) + 2
    canvas = Image.new("L", (cols + 2 * margin, rows + 2 * margin), 0)
    draw = ImageDraw.Draw(canvas)
    start_y = 0.0 if rng.random() < 0.5 else rows - 1.0
    start_x = cx + rng.uniform(-0.25, 0.25) * cols
    width = max(1, round(max(1.5, stroke, long_side * 0.002)))
    draw.line([(start_x + margin, start_y + margin), (cx + margin, cy + margin)], fill=255, width=width)
    draw.rectangle([start_x + margin - hub / 2, start_y + margin - hub, start_x + margin + hub / 2,
                    start_y + margin + hub], fill=255)
    full = np.asarray(canvas, dtype=np.float32) / np.float32(255)
    cover = full[margin:margin + rows, margin:margin + cols]
    total = int((full >= 0.5).sum())
    cut = int((cover >= 0.5).sum()) < total
    return cover, total, cut, math.hypot(cx - start_x, cy - start_y)


# --- detector artefacts and burned-in text


def _detector_artefacts(rng, intensity: np.ndarray, plan: ImagePlan, p: SynthParams, artefacts: list[str]) -> None:
    """Bad detector rows/columns (thin bright or dark lines) and faint periodic grid lines, in place."""
    rows, cols = intensity.shape
    k = 0 if plan.mag_view else 1
    scale = max(1, round(max(rows, cols) / 1024))
    if rng.random() < p.line_artefact_rate[k]:
        for _ in range(int(rng.integers(1, 4))):
            delta = np.float32(rng.uniform(0.04, 0.15) * (1 if rng.random() < 0.7 else -1))
            width = int(rng.integers(1, 3)) * scale
            along_rows = rng.random() < 0.5  # a bad row (else a bad column)
            length = cols if along_rows else rows
            at = int(rng.integers(0, (rows if along_rows else cols) - width + 1))
            a, b = sorted(int(e) for e in rng.integers(0, length, 2))
            if rng.random() < 0.5 or b - a < 2:
                a, b = 0, length  # the whole row / column
            if along_rows:
                intensity[at:at + width, a:b] += delta
            else:
                intensity[a:b, at:at + width] += delta
        artefacts.append("lines")
    if rng.random() < p.grid_rate[k]:
        period, amplitude = rng.uniform(3.0, 9.0) * scale, np.float32(rng.uniform(0.006, 0.025))
        if rng.random() < 0.5:
            wave = np.sin(np.arange(rows, dtype=np.float32) * np.float32(2 * math.pi / period))[:, None]
        else:
            wave = np.sin(np.arange(cols, dtype=np.float32) * np.float32(2 * math.pi / period))[None, :]
        intensity += amplitude * wave
        artefacts.append("grid")


def _font(height: int):
    try:
        return ImageFont.load_default(size=max(6, height))  # Pillow's built-in scalable font (FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _burn_in_text(rng, intensity: np.ndarray, plan: ImagePlan, p: SynthParams) -> np.ndarray:
    """Burned-in annotation ("L CC", "RMLO" ...) in a corner, bright as metal or nearly; returns its mask."""
    rows, cols = intensity.shape
    long_side = max(rows, cols)
    lat, view = plan.laterality, plan.view
    label = [f"{lat} {view}", f"{lat}{view}", f"{lat}-{view}", f"{view} {lat}", lat][int(rng.integers(0, 5))]
    lines = [label]
    if rng.random() < 0.35:
        lines.append([f"{int(rng.integers(24, 35))}kV {int(rng.integers(40, 200))}mAs",
                      f"{int(rng.integers(40, 160))}N", f"{int(rng.integers(20, 80))}mm"][int(rng.integers(0, 3))])
    height = max(7, round(long_side * rng.uniform(0.018, 0.045)))
    font = _font(height)
    text = "\n".join(lines)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font)
    width_px, height_px = int(right - left) + 2, int(bottom - top) + 2
    if width_px >= cols or height_px >= rows:
        return np.zeros((rows, cols), dtype=bool)
    stamp = Image.new("L", (width_px, height_px), 0)
    ImageDraw.Draw(stamp).multiline_text((1 - left, 1 - top), text, fill=255, font=font)
    cover = np.asarray(stamp, dtype=np.float32) / np.float32(255)
    # Mostly on the air side (away from the chest wall: right for L breasts here), top or bottom.
    away_right = (lat == "L") == (rng.random() < 0.8)
    margin = int(long_side * rng.uniform(0.01, 0.03))
    x = cols - width_px - margin if away_right else margin
    y = margin if rng.random() < 0.5 else rows - height_px - margin
    x, y = min(max(0, x), cols - width_px), min(max(0, y), rows - height_px)
    value = np.float32(METAL if rng.random() < p.text_saturated_rate else rng.uniform(0.8, 1.0))
    region = intensity[y:y + height_px, x:x + width_px]
    region += cover * (value - region)
    mask = np.zeros((rows, cols), dtype=bool)
    mask[y:y + height_px, x:x + width_px] = cover > 0
    return mask


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
    # Keep image pixels off the padding value: 0 (clipped up to 1) or, in MONOCHROME1, the top value.
    ceiling = top - 1 if vendor.padding_value == top else top
    stored = np.clip(np.rint(stored), 1, ceiling).astype(np.uint16)
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


def _write_study(out: Path, study: StudyPlan, seed: int, size: int | None,
                 params: SynthParams = CLASSIC) -> Iterator[dict[str, object]]:
    vendor = study.vendor
    study_uid = _uid("study", seed, study.index)
    series_uids: dict[tuple[str, bool], str] = {}
    folder = out / f"study{study.index:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for j, plan in enumerate(study.images):
        rng = image_rng(seed, study.index, j, params)
        rows, cols = _image_size(vendor, size)
        frames, drawn = [], []
        for _ in range(plan.frames):
            rendering = render_image(rng, rows, cols, plan, params)
            frames.append(stored_values(rendering.intensity, rendering.air, vendor, plan.for_processing))
            drawn.append(rendering)
        pixels = frames[0] if plan.frames == 1 else np.stack(frames)
        series_key = (plan.laterality, plan.mag_view)
        series_uid = series_uids.setdefault(series_key, _uid("series", seed, study.index, *series_key))
        sop_uid = _uid("sop", seed, study.index, j)
        ds = _dataset(study, plan, study_uid, series_uid, sop_uid, j, pixels,
                      burned_in=any(r.burned_in for r in drawn),
                      header=_header_plan(np.random.default_rng([seed, study.index, j, _salt(params.name + ":header")]),
                                          plan, params))
        path = folder / plan.file_name
        _save(ds, path, pixels, plan.compression)
        for frame, rendering in enumerate(drawn):
            row: dict[str, object] = {column: "" for column in GROUND_TRUTH_COLUMNS}
            row.update(rendering.attributes)
            row.update({
                "file": path.relative_to(out).as_posix(),
                "sop_instance_uid": sop_uid,
                "frame": frame,
                "study_instance_uid": study_uid,
                "patient_id_hash": patient_id_hash(study.patient["PatientID"]),
                # The label is what the pixels show: a marker pixel inside the image, not the plan.
                "biopsy_tool": int(bool(rendering.marker.any())),
                "mag_view": int(plan.mag_view),
                "manufacturer": vendor.manufacturer,
                "family": params.name,
                "vendor": vendor.key,
                "view": plan.view,
                "detector": f"{rows}x{cols}",
                "marker_boxes": marker_boxes(rendering.marker),
            })
            yield row


def marker_boxes(marker: np.ndarray) -> str:
    """The bounding box of each connected part (8-neighbours) of a marker mask: where a detector should look."""
    from scipy import ndimage

    labels, _ = ndimage.label(marker, structure=np.ones((3, 3), bool))
    return ";".join(f"{s[0].start} {s[1].start} {s[0].stop} {s[1].stop}" for s in ndimage.find_objects(labels))


def read_marker_boxes(value: str) -> list[tuple[int, int, int, int]]:
    """``marker_boxes`` back as (row0, col0, row1, col1) tuples."""
    boxes = []
    for box in value.split(";"):
        if box.strip():
            r0, c0, r1, c1 = (int(v) for v in box.split())
            boxes.append((r0, c0, r1, c1))
    return boxes


@dataclass(frozen=True)
class HeaderPlan:
    """What one image's header says of its view (drawn apart from the pixels: their streams stay as they were)."""

    mag_coded: bool  # a magnification view's header says so (View Modifier code, a magnified factor)
    factor: float  # Estimated Radiographic Magnification Factor, for vendors that write it


def _header_plan(rng: np.random.Generator, plan: ImagePlan, p: SynthParams) -> HeaderPlan:
    slipped = plan.mag_view and rng.random() < p.header_slip_rate
    factor = _uniform(rng, p.mag_factor_mag if plan.mag_view and not slipped else p.mag_factor_contact)
    return HeaderPlan(mag_coded=plan.mag_view and not slipped, factor=factor)


def _dataset(study: StudyPlan, plan: ImagePlan, study_uid: str, series_uid: str, sop_uid: str,
             number: int, pixels: np.ndarray, burned_in: bool = False, header: HeaderPlan | None = None):
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
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"  # text drawn into the pixels (e.g. "L CC")
    ds.PatientOrientation = ["A", "R" if plan.laterality == "L" else "L"] if plan.view == "CC" else ["A", "FR"]
    header = header or HeaderPlan(mag_coded=plan.mag_view, factor=1.8 if plan.mag_view else 1.07)
    _view_codes(ds, plan, vendor, header.mag_coded)
    if vendor.magnification_factor:  # (0018,1114) is Type 3: some writers leave it out
        ds.EstimatedRadiographicMagnificationFactor = f"{header.factor:.2f}"  # > 1 on contact views too

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
    # Some writers leave Presentation LUT Shape out: then the photometric interpretation alone decides.
    if vendor.presentation_lut_shape:
        ds.PresentationLUTShape = "INVERSE" if vendor.photometric == "MONOCHROME1" else "IDENTITY"
    if not plan.for_processing:
        _voi(ds, vendor)
    return ds


def _image_type_3(vendor: VendorStyle, plan: ImagePlan) -> str:
    # Only stereotactic procedure images say so in Image Type; a clip seen later is in no header.
    if "needle" in plan.tools and vendor.key == "hologic":
        return "PREFIRE"
    return ""


def _view_codes(ds, plan: ImagePlan, vendor: VendorStyle, mag_coded: bool) -> None:
    from pydicom.dataset import Dataset

    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator = {"CC": ("399162004", "SCT"), "MLO": ("399368009", "SCT"),
                                                   "ML": ("399260004", "SCT")}[plan.view]
    view.CodeMeaning = {"CC": "cranio-caudal", "MLO": "medio-lateral oblique", "ML": "medio-lateral"}[plan.view]
    modifiers = []
    if mag_coded and vendor.modifier_codes:
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
        if vendor.voi_lut_function:
            ds.VOILUTFunction = "LINEAR"  # (0028,1056) absent also means LINEAR (PS3.3 C.11.2.1.3)
        return
    ds.WindowCenter, ds.WindowWidth = f"{centre:.0f}", f"{width:.0f}"
    if vendor.voi_lut_function:
        ds.VOILUTFunction = {"sigmoid": "SIGMOID", "linear_exact": "LINEAR_EXACT"}.get(vendor.voi, "LINEAR")


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
