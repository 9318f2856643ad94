"""What the readers said about one task: the one set of rules every stage reads annotations by.

Training, the flagger and the reports all call these functions, so they can never disagree on
what a task's label is:

- cancelled (skipped) annotations are dropped: a skip says nothing about the image;
- each reader's latest annotation counts (a reader who changed their mind counts once);
- one reader's answer that is empty, unknown or contradictory (``neither`` with a finding) is
  unusable, and makes the task unusable;
- a single reader's answer stands; agreeing readers give the consensus; disagreeing readers
  give ``disputed`` until an adjudicator answers, and the adjudicated label wins everywhere.
  Only single, consensus and adjudicated labels are human labels: training learns from them,
  the flagger lets them override the model (``source=human``), the reports count them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Collection, Iterable, Mapping, Sequence

from mammoflag.spec import ModelSpec


class LabelStatus(StrEnum):
    """What the readers' answers amount to for one task."""

    UNLABELLED = "unlabelled"  # no submitted annotation (none, or only skips)
    SINGLE = "single"  # one reader answered: that answer stands
    CONSENSUS = "consensus"  # several readers, all (or min_agreement of them) gave the same answer
    DISPUTED = "disputed"  # readers disagree and no adjudicator has answered
    ADJUDICATED = "adjudicated"  # an adjudicator answered: that answer wins everywhere
    UNUSABLE = "unusable"  # a reader's answer is empty, unknown or contradictory


HUMAN_LABEL_STATUSES = frozenset({LabelStatus.SINGLE, LabelStatus.CONSENSUS, LabelStatus.ADJUDICATED})


@dataclass(frozen=True)
class Resolution:
    status: LabelStatus
    choices: frozenset[str] | None  # the label when status is a human label, else None
    readers: int  # readers whose answers counted (the agreeing ones for consensus)
    reason: str | None = None  # why there is no label (disputed, unusable); names ids, never patients

    @property
    def is_human_label(self) -> bool:
        """Whether the humans said something every stage may use as the image's label."""
        return self.status in HUMAN_LABEL_STATUSES


def reader_of(annotation: Mapping[str, Any]) -> str:
    """Who made an annotation: ``completed_by`` is an id in exports of 1.2x, a user dict in older ones."""
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("id", who.get("email"))
    return str(who) if who is not None else f"annotation-{annotation.get('id')}"


def choices_of(annotation: Mapping[str, Any], spec: ModelSpec) -> set[str]:
    """The choices of the spec's <Choices> tag in one annotation (other tags' results are ignored)."""
    chosen: set[str] = set()
    for result in annotation.get("result") or []:
        if result.get("type") != "choices" or result.get("from_name") != spec.choices_name:
            continue
        chosen.update((result.get("value") or {}).get("choices") or [])
    return chosen


def annotation_order(ann: Mapping[str, Any]) -> tuple[str, int]:
    """Sort key, newest last: ``updated_at`` (``created_at`` in older exports), then the id."""
    return str(ann.get("updated_at") or ann.get("created_at") or ""), int(ann.get("id") or 0)


def latest_per_reader(annotations: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each reader's most recent submitted annotation; cancelled ones (skips) are dropped first."""
    latest: dict[str, Mapping[str, Any]] = {}
    for ann in annotations:
        if ann.get("was_cancelled"):
            continue
        who = reader_of(ann)
        prev = latest.get(who)
        if prev is None or annotation_order(ann) >= annotation_order(prev):
            latest[who] = ann
    return latest


def answer_problem(chosen: set[str] | frozenset[str], spec: ModelSpec) -> str | None:
    """Why one reader's choice set cannot be a label (None: it can)."""
    if not chosen:
        return f"has no {spec.choices_name!r} choice"
    unknown = chosen - (set(spec.classes) | {spec.negative})
    if unknown:
        return f"has choices not in the label config: {sorted(unknown)}"
    if spec.negative in chosen and len(chosen) > 1:
        # a reader who ticks "neither" and a finding has not really decided
        return f"is contradictory: {spec.negative!r} together with {sorted(chosen - {spec.negative})}"
    return None


def reader_choice_sets(annotations: Sequence[Mapping[str, Any]], spec: ModelSpec) -> list[frozenset[str]]:
    """Each reader's latest answer as a choice set, for the agreement report; unusable answers are dropped."""
    sets = []
    for ann in latest_per_reader(annotations).values():
        chosen = choices_of(ann, spec)
        if answer_problem(chosen, spec) is None:
            sets.append(frozenset(chosen))
    return sets


def resolve(annotations: Sequence[Mapping[str, Any]], spec: ModelSpec, adjudicators: Collection[str] = (),
            min_agreement: float = 1.0) -> Resolution:
    """The one label resolver: what the readers said about one task (see docs/CONTRACTS.md).

    - An adjudicator's latest answer (a reader listed in ``adjudicators``, by id or email) wins.
    - Otherwise every reader's latest answer is checked first: one contradictory or unknown
      answer makes the task unusable, because a reader who ticks ``neither`` and a finding has
      not really decided.
    - One reader: that answer stands. Several: the answer at least ``min_agreement`` of them gave
      (default: all of them) is the consensus; else the task is disputed.
    """
    readers = latest_per_reader(annotations)
    if not readers:
        return Resolution(LabelStatus.UNLABELLED, None, 0)
    adjudications = [ann for who, ann in readers.items() if who in adjudicators or _email_of(ann) in adjudicators]
    if adjudications:
        final = max(adjudications, key=annotation_order)
        chosen = choices_of(final, spec)
        problem = answer_problem(chosen, spec)
        if problem:
            return Resolution(LabelStatus.UNUSABLE, None, len(readers), f"adjudication {final.get('id')} {problem}")
        return Resolution(LabelStatus.ADJUDICATED, frozenset(chosen), len(readers))
    sets: list[frozenset[str]] = []
    for who, ann in sorted(readers.items()):
        chosen = choices_of(ann, spec)
        problem = answer_problem(chosen, spec)
        if problem:
            return Resolution(LabelStatus.UNUSABLE, None, len(readers), f"annotation {ann.get('id')} {problem}")
        sets.append(frozenset(chosen))
    (top, votes), = Counter(sets).most_common(1)
    if votes / len(sets) + 1e-9 < min_agreement:
        answers = sorted("+".join(sorted(s)) for s in set(sets))
        return Resolution(LabelStatus.DISPUTED, None, len(sets),
                          f"readers disagree ({len(sets)} readers: {answers}); an adjudicator decides")
    return Resolution(LabelStatus.SINGLE if len(sets) == 1 else LabelStatus.CONSENSUS, top, votes)


def _email_of(annotation: Mapping[str, Any]) -> str | None:
    who = annotation.get("completed_by")
    return who.get("email") if isinstance(who, Mapping) else None


def target_for(choices: frozenset[str], spec: ModelSpec) -> tuple[float, ...]:
    """Multi-hot target in spec class order; the negative choice is all zeros."""
    return tuple(1.0 if c in choices else 0.0 for c in spec.classes)
