"""The Label Studio labeling config: the single source of the class list.

Everything else (training, the ML backend, the flagger) derives its classes from
:func:`load_label_config`, so renaming or adding a class happens in one XML file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Mapping

NEGATIVE_CHOICE = "neither"
KIND_ATTRIBUTE = "mammoflag-kind"  # on a <Choice>: what tells the finding (Label Studio ignores the attribute)


class FindingKind(str, Enum):
    """What in an image tells a finding, as the label config declares it (``mammoflag-kind`` on a Choice).

    Training uses it as a prior where a few hundred labels cannot decide (``training.train``: whether a
    class's tile classifier starts as the self-supervised foreign-object detector)."""

    OBJECT = "object"  # a small foreign object somewhere in the field: a biopsy clip, marker, needle
    VIEW = "view"  # a property of the whole field: a magnification or spot-compression view


class LabelConfigError(ValueError):
    """The labeling config does not have the shape mammoflag needs."""


@dataclass(frozen=True)
class LabelConfig:
    xml: str
    image_name: str  # name of the <Image> tag (to_name of results)
    image_value: str  # task data key holding the image URL, without '$'
    choices_name: str  # name of the <Choices> tag (from_name of results)
    choices: tuple[str, ...]  # all choices, in config order
    negative: str  # the choice meaning "no finding"
    hotkeys: dict[str, str]
    kinds: Mapping[str, FindingKind] = field(default_factory=dict)  # finding class -> declared kind (may be absent)

    @property
    def finding_classes(self) -> tuple[str, ...]:
        """The classes the model predicts: every choice except the negative one."""
        return tuple(c for c in self.choices if c != self.negative)


def default_config_path() -> Path:
    return Path(str(resources.files("label_config").joinpath("default.xml")))


def parse_label_config(xml: str, negative: str = NEGATIVE_CHOICE) -> LabelConfig:
    """Parse a Label Studio config with one <Image> and one <Choices> tag."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc
    images = root.findall(".//Image")
    choices_tags = root.findall(".//Choices")
    if len(images) != 1 or len(choices_tags) != 1:
        raise LabelConfigError(
            f"label config needs exactly one <Image> and one <Choices>; found {len(images)} and {len(choices_tags)}"
        )
    image, choices_tag = images[0], choices_tags[0]
    if choices_tag.get("toName") != image.get("name"):
        raise LabelConfigError("<Choices toName> must name the <Image>")
    values = tuple(c.get("value") or "" for c in choices_tag.findall("Choice"))
    if negative not in values:
        raise LabelConfigError(f"label config has no negative choice {negative!r}")
    if len(values) < 2 or len(set(values)) != len(values) or "" in values:
        raise LabelConfigError(f"label config choices must be unique and non-empty: {values}")
    kinds: dict[str, FindingKind] = {}
    for c in choices_tag.findall("Choice"):
        declared = c.get(KIND_ATTRIBUTE)
        if declared is None:
            continue
        if c.get("value") == negative:
            raise LabelConfigError(f"label config: the negative choice {negative!r} cannot have {KIND_ATTRIBUTE}")
        try:
            kinds[c.get("value", "")] = FindingKind(declared)
        except ValueError:
            raise LabelConfigError(f"label config: Choice {c.get('value')!r} has {KIND_ATTRIBUTE}={declared!r}; "
                                   f"use one of {[k.value for k in FindingKind]} or leave it out") from None
    return LabelConfig(
        xml=xml,
        image_name=image.get("name", ""),
        image_value=(image.get("value") or "").lstrip("$"),
        choices_name=choices_tag.get("name", ""),
        choices=values,
        negative=negative,
        hotkeys={c.get("value", ""): c.get("hotkey", "") for c in choices_tag.findall("Choice")},
        kinds=kinds,
    )


def load_label_config(path: str | Path | None = None) -> LabelConfig:
    """Load the project's label config (the packaged default unless a path is given)."""
    p = Path(path) if path else default_config_path()
    return parse_label_config(p.read_text(encoding="utf-8"))
