"""Which classes a flagging run writes flags for, by the model card's trust gate.

A research lead exports cohorts from flags.csv without checking images one by one, so a flag
from a class the model has not learned must not look like one it has:

- by default only ``learned`` classes are flagged; the others' ``flag_<class>`` cells stay
  empty (not 0: 0 would claim "no finding") and the run says why, with the figures;
- asking for a class that is not learned (``--classes``) is refused, naming the class and its
  figures, unless ``allow_unreliable`` is set: then it is flagged with ``reliable_<class>=0``;
- every study row carries ``reliable_<class>`` (1 only for learned classes), which
  ``mammoflag cohort`` checks before it selects on a class.

A verdict is earned on the validation images, which come from the manufacturers the labels came from.
Studies from a manufacturer with no validation image are outside what the verdict speaks for (across
synthetic families, a class judged ``learned`` on one family's validation ranked the other's images at
AUROC 0.62: benchmarks/results/generalisation.json); the run names them and how many
(``unvalidated_manufacturers``), so that their images get labelled before their flags are trusted.
A cohort can differ from the validation under known manufacturer names too (another site's
protocol, processing or population): ``mammoflag.novelty.cohort_shift`` tests the share of its images
farther from every training image than the validation's were, and the run says when that share is more
than chance allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from mammoflag.card import UNKNOWN_MANUFACTURER, ModelCard, Verdict


class UnreliableClass(ValueError):
    """A class was asked for whose flags the model card does not support."""


@dataclass(frozen=True)
class ClassSelection:
    classes: tuple[str, ...]  # every class of the model, in spec order
    flagged: frozenset[str]  # the classes whose flags are written
    verdicts: Mapping[str, Verdict]

    def reliable(self, cls: str) -> bool:
        return self.verdicts.get(cls) is Verdict.LEARNED

    @classmethod
    def everything(cls, classes: Sequence[str]) -> "ClassSelection":
        """Every class flagged and reliable: for callers that judged trust themselves (tests, benchmarks)."""
        return cls(tuple(classes), frozenset(classes), {c: Verdict.LEARNED for c in classes})


def select_classes(card: ModelCard, requested: Sequence[str] | None = None,
                   allow_unreliable: bool = False) -> tuple[ClassSelection, list[str]]:
    """The selection for this run and the warnings to print; raises UnreliableClass for a refused request."""
    classes = tuple(card.spec.classes)
    verdicts = {c: card.verdict(c) for c in classes}
    unknown = [c for c in (requested or ()) if c not in classes]
    if unknown:
        raise UnreliableClass(f"unknown class {', '.join(unknown)}: model {card.version} has {', '.join(classes)}")
    wanted = tuple(requested) if requested else classes
    unlearned = [c for c in wanted if verdicts[c] is not Verdict.LEARNED]
    warnings: list[str] = []
    if allow_unreliable:
        flagged = frozenset(wanted)
        warnings += [f"{card.explain(c)}; flagged anyway (--allow-unreliable) with reliable_{c}=0"
                     for c in unlearned]
    elif requested and unlearned:
        raise UnreliableClass("refusing to flag " + "; ".join(card.explain(c) for c in unlearned)
                              + ". Label more images and retrain, or pass --allow-unreliable to write these flags "
                                "with reliable_<class>=0")
    else:
        flagged = frozenset(c for c in wanted if verdicts[c] is Verdict.LEARNED)
        if not flagged:
            raise UnreliableClass("no class of model " + card.version + " is learned: "
                                  + "; ".join(card.explain(c) for c in wanted)
                                  + ". Label more images and retrain, or pass --allow-unreliable")
        warnings += [f"{card.explain(c)}; not flagged (its flag_{c} cells are empty)" for c in unlearned]
    return ClassSelection(classes, flagged, verdicts), warnings


def unvalidated_manufacturers(card: ModelCard, studies_by_manufacturer: Mapping[str, int]) -> dict[str, int]:
    """Studies per manufacturer of this run that the card's validation holds no image of (empty when the
    card records no per-manufacturer validation, as stand-in cards do: nothing to compare with)."""
    validated = set(card.metrics.by_manufacturer)
    if not validated:
        return {}
    return {m: n for m, n in sorted(studies_by_manufacturer.items()) if (m or UNKNOWN_MANUFACTURER) not in validated}
