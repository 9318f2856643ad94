"""The shared core: label config, settings, spec, registry, paths, inference helpers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from label_config import FindingKind, LabelConfigError, load_label_config, parse_label_config
from mammoflag.inference import OnnxClassifier, choices_for, flags_from_probabilities, uncertainty_score
from mammoflag.paths import UnsafeImagePath, resolve_task_image, task_url_for
from mammoflag.preprocess import letterbox, model_input
from mammoflag.registry import Registry, RegistryError, resolve_model
from mammoflag.settings import MissingSecret, Settings
from mammoflag.spec import ModelSpec, SpecMismatch

from factories import tiny_model_version


def test_default_label_config_is_the_class_list():
    cfg = load_label_config()
    assert cfg.choices == ("biopsy_tool", "mag_view", "neither")
    assert cfg.finding_classes == ("biopsy_tool", "mag_view")
    assert cfg.hotkeys == {"biopsy_tool": "1", "mag_view": "2", "neither": "3"}
    assert (cfg.choices_name, cfg.image_name, cfg.image_value) == ("findings", "image", "image")
    assert cfg.kinds == {"biopsy_tool": FindingKind.OBJECT, "mag_view": FindingKind.VIEW}


@pytest.mark.parametrize("xml, message", [
    ("<View>", "not valid XML"),
    ("<View><Image name='i' value='$x'/></View>", "exactly one"),
    ("<View><Image name='i' value='$x'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
     "no negative"),
    ("<View><Image name='i' value='$x'/><Choices name='c' toName='j'><Choice value='neither'/></Choices></View>",
     "toName"),
    ("<View><Image name='i' value='$x'/><Choices name='c' toName='i'><Choice value='clip' mammoflag-kind='thing'/>"
     "<Choice value='neither'/></Choices></View>", "Choice 'clip' has mammoflag-kind='thing'"),
    ("<View><Image name='i' value='$x'/><Choices name='c' toName='i'><Choice value='clip'/>"
     "<Choice value='neither' mammoflag-kind='view'/></Choices></View>", "negative choice 'neither' cannot"),
])
def test_bad_label_configs_are_refused_with_reason(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_secrets_have_no_defaults_and_do_not_leak_in_repr(tmp_path):
    s = Settings.from_env({"MAMMOFLAG_HOME": str(tmp_path)})
    with pytest.raises(MissingSecret, match="MAMMOFLAG_WEBHOOK_SECRET"):
        s.webhook_secret.get()
    s2 = Settings.from_env({"MAMMOFLAG_HOME": str(tmp_path), "MAMMOFLAG_WEBHOOK_SECRET": "hunter2-secret"})
    assert s2.webhook_secret.get() == "hunter2-secret"
    assert "hunter2-secret" not in repr(s2)
    assert s2.data_root == tmp_path / "data" and s2.broker_url.startswith("sqla+sqlite:")


def test_spec_round_trips_and_detects_drift():
    cfg = load_label_config()
    spec = ModelSpec.from_label_config(cfg, input_size=96).with_calibration(
        {"biopsy_tool": 1.5, "mag_view": 0.8}, {"biopsy_tool": 0.2, "mag_view": 0.4})
    again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec and again.kinds["biopsy_tool"] is FindingKind.OBJECT
    again.check_compatible(cfg)
    # a version written before kinds existed, or by a later release with a kind this code does not know
    old = {k: v for k, v in spec.to_json().items() if k != "kinds"}
    assert ModelSpec.from_json(old).kinds == {}
    assert ModelSpec.from_json({**old, "kinds": {"biopsy_tool": "object", "mag_view": "texture"}}).kinds == {
        "biopsy_tool": FindingKind.OBJECT}
    other = parse_label_config(cfg.xml.replace('value="mag_view"', 'value="spot_view"'))
    with pytest.raises(SpecMismatch, match="differ from label config"):
        spec.check_compatible(other)


def test_model_input_letterboxes_without_cropping():
    img = np.zeros((400, 200), np.uint8)
    img[:, -8:] = 255  # a marker on the very edge must survive
    sq = letterbox(img, 64)
    assert sq.shape == (64, 64)
    assert sq[:, :16].max() == 0 and sq[:, 48:].max() == 0  # padding left and right, centred
    assert sq[:, 16:48].max() > 100  # the edge column is still visible
    x = model_input(img, 64)
    assert x.shape == (5, 64, 64) and x.dtype == np.uint8  # area, max, top-hat, 2 tile planes; uint8
    assert (x[:3, :, :16] == 0).all() and (x[:3, :, 48:] == 0).all()  # the whole-image planes letterboxed alike
    assert x[1, :, 16:48].max() == 255  # the edge column at full brightness in the max channel
    small = np.full((400, 200), 90, np.uint8)
    small[200:206, -4:] = 255  # a small marker cut by the image edge: also in the top-hat channel
    assert model_input(small, 64)[2].max() > 100 and model_input(np.full((400, 200), 90, np.uint8), 64)[2].max() == 0


def test_task_urls_cannot_escape_the_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "imp" / "images").mkdir(parents=True)
    img = root / "imp" / "images" / "a b.png"
    img.write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    url = task_url_for(img, root)
    assert url == "/data/local-files/?d=imp/images/a%20b.png"
    assert resolve_task_image(url, root) == img.resolve()
    assert resolve_task_image("http://ls:8080" + url, root) == img.resolve()
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    for bad in ["/data/local-files/?d=../secret.txt", "/data/local-files/?d=/etc/passwd",
                "/data/local-files/?d=imp/../../secret.txt", "/data/local-files/?d=link.txt",
                "http://evil.example/x.png", "file:///etc/passwd", "/data/upload/1/x.png",
                "/data/local-files/?x=1"]:
        with pytest.raises(UnsafeImagePath):
            resolve_task_image(bad, root)


def test_uncertainty_score_is_lowest_at_half():
    probs = np.array([[0.5, 0.01], [0.9, 0.05], [0.01, 0.02]])
    s = uncertainty_score(probs)
    assert s[0] == pytest.approx(0.0)
    assert s[0] < s[1] < s[2] <= 1.0


def test_choices_and_flags_use_calibrated_thresholds():
    spec = ModelSpec.from_label_config(load_label_config()).with_calibration(
        {"biopsy_tool": 1, "mag_view": 1}, {"biopsy_tool": 0.3, "mag_view": 0.7})
    assert choices_for([0.31, 0.69], spec) == ["biopsy_tool"]
    assert choices_for([0.1, 0.1], spec) == ["neither"]
    assert flags_from_probabilities(np.array([[0.3, 0.7]]), spec).tolist() == [[True, True]]


def test_registry_publish_and_pointer(tmp_path):
    spec = ModelSpec.from_label_config(load_label_config(), input_size=32)
    reg = Registry(tmp_path / "models")
    assert reg.current() is None
    with pytest.raises(RegistryError):
        resolve_model(reg.root)
    v1 = tiny_model_version(reg.root, spec)
    v2 = tiny_model_version(reg.root, spec, make_current=False)
    assert [v.name for v in reg.versions()] == [v1.name, v2.name]
    assert reg.current_name() == v1.name and resolve_model(reg.root).name == v1.name
    assert resolve_model(v2.path).name == v2.name
    assert not list(reg.root.glob(".staging-*"))
    with pytest.raises(RegistryError):
        reg.set_current("v9999-nope")
    reg.set_current(v2.name)
    assert reg.current().name == v2.name
    # a staging folder abandoned by a killed writer is never read as a version
    (reg.root / ".staging-dead").mkdir()
    assert [v.name for v in reg.versions()] == [v1.name, v2.name]


def test_onnx_classifier_batches_any_size(tmp_path):
    spec = ModelSpec.from_label_config(load_label_config(), input_size=32)
    clf = OnnxClassifier(tiny_model_version(tmp_path, spec))
    dark, bright = np.zeros((50, 40), np.uint8), np.full((50, 40), 255, np.uint8)
    p = clf.probabilities_for_displays([dark, bright, dark])
    assert p.shape == (3, 2)
    assert p[1, 0] > p[0, 0] and p[0, 0] == pytest.approx(p[2, 0])
    assert clf.probabilities_for_displays([]).shape == (0, 2)


def test_training_knobs_are_read_once_with_the_settings(tmp_path):
    from mammoflag.settings import Settings
    from training.train import TrainConfig

    settings = Settings.from_env({"MAMMOFLAG_HOME": str(tmp_path), "MAMMOFLAG_TRAIN_EPOCHS": "5",
                                  "MAMMOFLAG_TRAIN_QUANTIZE_INT8": "no", "MAMMOFLAG_TARGET_SENSITIVITY": "0.9"})
    assert settings.train_knobs == {"epochs": "5", "quantize_int8": "no"}
    config = TrainConfig.from_settings(settings, defaults={"mode": "auto", "epochs": "2"})
    assert (config.mode, config.epochs, config.quantize_int8, config.target_sensitivity) == ("auto", 5, False, 0.9)
    with pytest.raises(ValueError, match="MAMMOFLAG_TRAIN_EPOCHS"):
        TrainConfig.from_settings(Settings.from_env({"MAMMOFLAG_HOME": str(tmp_path), "MAMMOFLAG_TRAIN_EPOCHS": "x"}))
