"""The model spec shared by training, the ML backend and the flagger.

One object says what a model is: which classes (read from the label config), which
input size and preprocessing, and its calibrated temperatures and thresholds. The
registry stores it in each version's ``model.json``; every consumer checks it against
the live label config, so training, serving and flagging can never drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from label_config import FindingKind, LabelConfig

# Bump when mammoflag.preprocess.model_input changes in any way a model would notice.
PREPROCESSING_VERSION = "display8-area-max-tophat-tiles32-u8-v3"
DEFAULT_INPUT_SIZE = 256
# The network a version was trained as (training/network.py names them; "resnet18" is the torchvision
# body, used only when ImageNet weights are configured). Versions written before the field was
# recorded were all ResNet18.
DEFAULT_ARCHITECTURE = "markerpatch"
LEGACY_ARCHITECTURE = "resnet18"


class SpecMismatch(ValueError):
    """A model was built for other classes or other preprocessing than this code uses."""


@dataclass(frozen=True)
class ModelSpec:
    classes: tuple[str, ...]  # finding classes, one sigmoid output each, in label-config order
    negative: str  # the label-config choice meaning "no finding"
    choices_name: str  # from_name of Label Studio results
    image_name: str  # to_name of Label Studio results
    image_key: str  # task data key holding the image URL
    input_size: int = DEFAULT_INPUT_SIZE
    preprocessing_version: str = PREPROCESSING_VERSION
    architecture: str = DEFAULT_ARCHITECTURE
    temperatures: Mapping[str, float] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)
    # Header evidence (mammoflag/header_evidence.py): per class, how far each named header feature moves the
    # calibrated logit. Empty: the image alone (versions before header fusion; classes the header says nothing of).
    header_features: tuple[str, ...] = ()
    header_weights: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # What tells each class, as the label config declares it (``mammoflag-kind``); a class it leaves out is
    # decided from the labels. A prior for training only: serving and flagging do not read it.
    kinds: Mapping[str, FindingKind] = field(default_factory=dict)

    @classmethod
    def from_label_config(cls, cfg: LabelConfig, input_size: int = DEFAULT_INPUT_SIZE) -> "ModelSpec":
        return cls(
            classes=cfg.finding_classes,
            negative=cfg.negative,
            choices_name=cfg.choices_name,
            image_name=cfg.image_name,
            image_key=cfg.image_value,
            input_size=input_size,
            temperatures={c: 1.0 for c in cfg.finding_classes},
            thresholds={c: 0.5 for c in cfg.finding_classes},
            kinds=dict(cfg.kinds),
        )

    def with_calibration(self, temperatures: Mapping[str, float], thresholds: Mapping[str, float],
                         header_features: tuple[str, ...] = (),
                         header_weights: Mapping[str, tuple[float, ...]] | None = None) -> "ModelSpec":
        weights = {c: tuple(float(x) for x in w) for c, w in (header_weights or {}).items()}
        return replace(self, temperatures=dict(temperatures), thresholds=dict(thresholds),
                       header_features=tuple(header_features) if weights else (), header_weights=weights)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["temperatures"] = dict(self.temperatures)
        d["thresholds"] = dict(self.thresholds)
        d["header_features"] = list(self.header_features)
        d["header_weights"] = {c: list(w) for c, w in self.header_weights.items()}
        d["kinds"] = {c: k.value for c, k in self.kinds.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelSpec":
        return cls(
            classes=tuple(d["classes"]),
            negative=d["negative"],
            choices_name=d["choices_name"],
            image_name=d["image_name"],
            image_key=d["image_key"],
            input_size=int(d["input_size"]),
            preprocessing_version=d["preprocessing_version"],
            architecture=str(d.get("architecture") or LEGACY_ARCHITECTURE),
            temperatures={k: float(v) for k, v in d.get("temperatures", {}).items()},
            thresholds={k: float(v) for k, v in d.get("thresholds", {}).items()},
            header_features=tuple(str(n) for n in d.get("header_features") or ()),
            header_weights={k: tuple(float(x) for x in v) for k, v in (d.get("header_weights") or {}).items()},
            # a kind this code does not know (a later version's) is read as undeclared: only training uses it
            kinds={c: FindingKind(k) for c, k in (d.get("kinds") or {}).items()
                   if k in FindingKind._value2member_map_},
        )

    def check_compatible(self, cfg: LabelConfig) -> None:
        """Raise SpecMismatch unless this model fits the live label config and preprocessing code."""
        if tuple(cfg.finding_classes) != tuple(self.classes):
            raise SpecMismatch(
                f"model classes {list(self.classes)} differ from label config classes {list(cfg.finding_classes)}"
            )
        if self.preprocessing_version != PREPROCESSING_VERSION:
            raise SpecMismatch(
                f"model preprocessing {self.preprocessing_version!r} differs from this code's {PREPROCESSING_VERSION!r}"
            )
