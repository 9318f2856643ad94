"""Header evidence: the header features a version weighs beside the image, from every place hints live."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from mammoflag.datadir import HeaderHints
from mammoflag.dicom.headers import header_hints
from mammoflag.header_evidence import (HEADER_FEATURES, evidence_matrix, header_evidence, header_matrix, select_features,
                                       weight_matrix)
from mammoflag.inference import calibrated_probabilities, sigmoid
from mammoflag.spec import ModelSpec
from label_config import load_label_config


def column(name: str) -> int:
    return HEADER_FEATURES.index(name)


def test_manifest_rows_task_data_and_hints_give_the_same_evidence():
    manifest_row = {"view_modifiers": "spot_compression|magnification", "image_type": "ORIGINAL|PRIMARY|PREFIRE",
                    "magnification_factor": "1.8", "partial_view": "YES"}
    task_data = {"view_modifiers": ["spot_compression", "magnification"], "image_type": ["ORIGINAL", "PRIMARY",
                 "PREFIRE"], "magnification_factor": "1.8", "partial_view": "YES", "image": "/data/local-files/?d=x"}
    hints = HeaderHints(view_modifiers=("spot_compression", "magnification"), image_type=("ORIGINAL", "PRIMARY",
                        "PREFIRE"), image_type_3="PREFIRE", magnification_factor="1.8", partial_view="YES").as_dict()
    evidence = [header_evidence(x) for x in (manifest_row, task_data, hints)]
    for e in evidence[1:]:
        np.testing.assert_array_equal(e, evidence[0])
    e = evidence[0]
    assert e[column("mag_factor_present")] == 1 and e[column("mag_factor_excess")] == pytest.approx(0.8)
    assert e[column("mag_modifier")] == e[column("spot_modifier")] == e[column("partial_view")] == 1
    assert e[column("biopsy_image_type")] == 1 and e[column("header_speaks")] == 1


@pytest.mark.parametrize("fields", [None, {}, "not a mapping", {"magnification_factor": "1e6"},
                                    {"magnification_factor": "abc", "view_modifiers": 7, "image_type": {"a": 1}},
                                    {"magnification_factor": "nan", "partial_view": "NO"}])
def test_an_empty_or_hostile_header_says_nothing(fields):
    """All zeros: the image model's own answer, never an error."""
    np.testing.assert_array_equal(header_evidence(fields), np.zeros(len(HEADER_FEATURES)))


def test_a_contact_factor_is_present_but_small_and_the_excess_is_capped():
    contact, huge = header_evidence({"magnification_factor": "1.07"}), header_evidence({"magnification_factor": "4"})
    assert contact[column("mag_factor_present")] == 1 and contact[column("mag_factor_excess")] == pytest.approx(0.07)
    assert huge[column("mag_factor_excess")] == 1.5
    assert header_matrix([]).shape == (0, len(HEADER_FEATURES))


def test_headers_read_the_magnification_factor_and_partial_view_and_drop_junk():
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.EstimatedRadiographicMagnificationFactor = "1.80"
    ds.PartialView = "YES"
    hints = header_hints(ds, None)
    assert hints.magnification_factor == "1.8" and hints.partial_view == "YES"
    bad = Dataset()  # as read from a file: the value is converted (and fails) only when the hints ask for it
    bad[0x00181114] = RawDataElement(Tag(0x00181114), "DS", 12, b"not-a-number", 0, True, True)
    assert header_hints(bad, None).magnification_factor == ""  # no factor, and no error
    assert header_hints(Dataset(), None).magnification_factor == ""


def _spec(weights):
    spec = ModelSpec.from_label_config(load_label_config())
    return spec.with_calibration({c: 2.0 for c in spec.classes}, {c: 0.5 for c in spec.classes}, HEADER_FEATURES,
                                 weights)


def test_stacked_evidence_keeps_each_image_and_zeros_those_without_any():
    told = header_evidence({"view_modifiers": "magnification", "magnification_factor": "1.8"})
    m = evidence_matrix([None, told, (), told.tolist()])
    assert m.shape == (4, len(HEADER_FEATURES))
    assert not m[0].any() and not m[2].any()
    assert np.array_equal(m[1], told) and np.array_equal(m[3], told)
    assert evidence_matrix([]).shape == (0, len(HEADER_FEATURES))


def test_weight_matrix_gives_a_zero_row_to_a_class_without_weights():
    w = weight_matrix({"mag_view": (1.0, 2.0)}, ("biopsy_tool", "mag_view"), 2)
    assert w.tolist() == [[0.0, 0.0], [1.0, 2.0]]
    assert weight_matrix({}, ("a", "b"), 0).shape == (2, 0)


def test_served_probabilities_add_the_header_offset_and_round_trip_through_json():
    spec = _spec({"mag_view": (-1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0)})
    k = spec.classes.index("mag_view")
    logits = np.array([[1.0] * len(spec.classes), [1.0] * len(spec.classes)])
    header = header_matrix([{"view_modifiers": "magnification", "magnification_factor": "1.5"}, {}])
    probs = calibrated_probabilities(logits, spec, header)
    assert probs[0, k] == pytest.approx(sigmoid(0.5 - 1.0 + 2.0 * 0.5 + 3.0))
    assert probs[1, k] == pytest.approx(sigmoid(0.5))  # no header evidence: the image alone
    np.testing.assert_allclose(calibrated_probabilities(logits, spec), sigmoid(logits / 2.0))  # no header given
    other = [j for j in range(len(spec.classes)) if j != k]
    np.testing.assert_allclose(probs[:, other], sigmoid(logits[:, other] / 2.0))  # classes without weights
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.header_features == HEADER_FEATURES


def test_a_version_fitted_on_features_this_code_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown to this code"):
        select_features(np.zeros((1, len(HEADER_FEATURES))), ("mag_factor_excess", "detector_width"))
    old = ModelSpec.from_json({k: v for k, v in _spec({}).to_json().items()
                               if k not in ("header_features", "header_weights")})
    assert old.header_weights == {} and old.header_features == ()
