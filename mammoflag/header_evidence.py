"""Header evidence: what an image's DICOM header says about the finding classes, as model inputs.

Lituiev et al. (J Digit Imaging 2019) found special views over 772k mammograms at AUC 0.997 by
combining header fields with the image. The headers are filled in inconsistently (vendors that
never write View Modifier codes, technologists who forget them, a magnification factor above 1
on contact views too), so the header never decides alone: training fits, per class, how far each
header feature moves the image's calibrated logit, on the same validation labels the temperature
is fitted on (``training.calibrate.fit_header_weights``), and serving adds that offset
(``mammoflag.inference.calibrated_probabilities``).

Every feature is 0 when its field is absent, so an image whose header says nothing (a vendor
that writes none of these, a DATA_DIR imported before these hints existed, a task without them)
gets exactly the image model's probability: the image alone still works when headers are empty.

The features, in ``HEADER_FEATURES`` order (a version records the names it was fitted on):

- ``header_speaks``: any of the features below is non-zero. Its weight is the intercept of images
  whose header says something; training sets it so that one threshold catches the target share of
  validation positives among those images as among images judged by the pixels alone
  (``training.calibrate.calibrate``).
- ``mag_factor_present``: Estimated Radiographic Magnification Factor (0018,1114) is written.
  Its weight is the offset for "this writer records geometry", whatever the value.
- ``mag_factor_excess``: that factor minus 1, clipped to 0..1.5 (contact views are ~1.0-1.15:
  the breast sits above the detector; magnification views ~1.5-2).
- ``mag_modifier`` / ``spot_modifier``: a Magnification / Spot Compression View Modifier code.
- ``partial_view``: Partial View (0028,1350) is YES (a field that misses part of the breast).
- ``biopsy_image_type``: Image Type value 3 names a stereotactic or tomosynthesis biopsy image.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mammoflag.datadir import LIST_SEPARATOR, MAGNIFICATION, SPOT_COMPRESSION, header_flags, image_type_3

HEADER_FEATURES: tuple[str, ...] = ("header_speaks", "mag_factor_present", "mag_factor_excess", "mag_modifier", "spot_modifier",
                                    "partial_view", "biopsy_image_type")
MAG_FACTOR_EXCESS_MAX = 1.5
# A factor outside this range is a writing error, not geometry (0 or 1e6 seen in the wild); it counts as absent.
MAG_FACTOR_RANGE = (0.5, 5.0)


def magnification_factor(value: Any) -> float | None:
    """The Estimated Radiographic Magnification Factor as written ("" / junk / out of range: None)."""
    try:
        f = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or not MAG_FACTOR_RANGE[0] <= f <= MAG_FACTOR_RANGE[1]:
        return None
    return f


def _names(value: Any) -> tuple[str, ...]:
    """A list field as manifest.csv ('|'-joined), task data (JSON list) or HeaderHints (tuple) give it."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(LIST_SEPARATOR) if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return ()


def header_evidence(fields: Mapping[str, Any] | None) -> np.ndarray:
    """(len(HEADER_FEATURES),) float64 from a manifest row, a task's ``data`` or ``HeaderHints.as_dict()``.

    Anything missing or unreadable is 0: a hostile or empty task gives the image model's answer."""
    out = np.zeros(len(HEADER_FEATURES), dtype=np.float64)
    if not isinstance(fields, Mapping):
        return out
    factor = magnification_factor(fields.get("magnification_factor", ""))
    modifiers = _names(fields.get("view_modifiers"))
    value_3 = fields.get("image_type_3") or image_type_3(LIST_SEPARATOR.join(_names(fields.get("image_type"))))
    _, _, biopsy = header_flags(modifiers, str(value_3))
    if factor is not None:
        out[1] = 1.0
        out[2] = min(MAG_FACTOR_EXCESS_MAX, max(0.0, factor - 1.0))
    out[3] = float(MAGNIFICATION in modifiers)
    out[4] = float(SPOT_COMPRESSION in modifiers)
    out[5] = float(str(fields.get("partial_view") or "").strip().upper() == "YES")
    out[6] = float(biopsy)
    out[0] = float(bool(np.any(out[1:])))
    return out


def header_matrix(rows: Iterable[Mapping[str, Any] | None]) -> np.ndarray:
    """(N, len(HEADER_FEATURES)): ``header_evidence`` of each row."""
    stacked = [header_evidence(r) for r in rows]
    return np.stack(stacked) if stacked else np.zeros((0, len(HEADER_FEATURES)))


def evidence_matrix(evidence: Iterable[Sequence[float] | np.ndarray | None]) -> np.ndarray:
    """(N, len(HEADER_FEATURES)) from each image's evidence already computed (``header_evidence``), zeros
    where an image has none (a task without hints, a version of the data before header evidence)."""
    rows = [np.zeros(len(HEADER_FEATURES)) if e is None or len(e) == 0 else np.asarray(e, dtype=np.float64)
            for e in evidence]
    return np.stack(rows) if rows else np.zeros((0, len(HEADER_FEATURES)))


def weight_matrix(header_weights: Mapping[str, Sequence[float]], classes: Sequence[str], features: int) -> np.ndarray:
    """(C, features): each class's header weights in ``classes`` order, a zero row for a class without any."""
    none = (0.0,) * features
    rows = [tuple(header_weights.get(c, none)) for c in classes]
    return np.array(rows, dtype=np.float64).reshape(len(classes), features)


def select_features(header: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The columns of a ``header_matrix`` a version was fitted on, in its order (``ModelSpec.header_features``)."""
    try:
        columns = [HEADER_FEATURES.index(n) for n in names]
    except ValueError:
        unknown = sorted(set(names) - set(HEADER_FEATURES))
        raise ValueError(f"model header features {unknown} are unknown to this code ({list(HEADER_FEATURES)})") from None
    return np.asarray(header, dtype=np.float64)[:, columns]
