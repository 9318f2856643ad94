"""The report's figures, computed from typed records: pure functions, no HTML, no Label Studio.

Which images judge a model version: those a human read *after* the version was made (the
first answer is later than the card's ``created_at``). The version never trained or
calibrated on them, so they are held out for it, like the card's out-of-fold estimate, and
unlike its in-sample validation figures. Every figure names how many images it rests on.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mammoflag.agreement import DEFAULT_RESAMPLES, ClassAgreement, class_agreement
from mammoflag.card import AcquisitionOrder, ModelCard
from mammoflag.inference import calibrated_probabilities, sigmoid
from mammoflag.header_evidence import evidence_matrix
from mammoflag.labels import LabelStatus
from mammoflag.novelty import ShiftTest
from mammoflag.stats import ReliabilityCurve, positives_for_half_width, reliability_curve, wilson_interval
from reports.inputs import AuditImage, HeaderSays, TaskRecord

UNCERTAIN_BITS = 0.5  # an image is shown as uncertain when some class's binary entropy is at least this (p ~ 0.11-0.89)
HALF_WIDTH_WANTED = 0.10  # a subgroup's interval narrower than +-0.10, or the report says it is not


@dataclass(frozen=True)
class VersionInfo:
    name: str
    card: ModelCard
    current: bool = False
    path: Path | None = None  # the registry folder (its ONNX files), None in tests that score otherwise

    @property
    def created(self) -> datetime | None:
        try:
            return datetime.strptime(self.card.created_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            return None


@dataclass(frozen=True)
class Scores:
    """A version's raw logits (as served: INT8 when kept) on some records, in spec class order."""

    version: str
    task_ids: tuple[int, ...]
    logits: np.ndarray = field(repr=False)  # (N, C)


# (version, records) -> Scores; the CLI passes one that runs the version's ONNX file
Scorer = Callable[[VersionInfo, Sequence[TaskRecord]], Scores]


def held_out_for(version: VersionInfo, records: Sequence[TaskRecord]) -> list[TaskRecord]:
    """Human-labelled records first read after the version was made, with an image to score."""
    made = version.created
    return [r for r in records if r.resolution.is_human_label and r.image is not None and made is not None
            and r.first_read_at is not None and r.first_read_at > made]


def targets_of(records: Sequence[TaskRecord], classes: Sequence[str]) -> np.ndarray:
    return np.array([[c in (r.resolution.choices or ()) for c in classes] for r in records], dtype=np.float64) \
        .reshape(len(records), len(classes))


# -- sections --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationRow:
    version: str
    cls: str
    n: int
    positives: int
    temperature: float
    before: ReliabilityCurve  # sigmoid(logit): the network's own confidence
    after: ReliabilityCurve  # sigmoid(logit / T): as served
    card_oof_ece: float | None  # the card's out-of-fold ECE on its validation patients (after scaling)


@dataclass(frozen=True)
class OofCalibrationRow:
    """A version's reliability on its card's out-of-fold estimate (no image re-scored by the report)."""

    version: str
    cls: str
    split: str  # which split, in words
    n: int  # pooled out-of-fold images
    positives: int
    temperature: float  # the version's served temperature (fitted on all its validation images)
    fold_temperatures: tuple[float, ...]  # what each fold was scored with (fitted on the other folds)
    before: ReliabilityCurve  # sigmoid(logit)
    after: ReliabilityCurve  # sigmoid(logit / T of the other folds)


@dataclass(frozen=True)
class SubgroupRow:
    grouping: str  # "site" or "manufacturer / model"
    value: str
    cls: str
    n: int
    positives: int
    negatives: int
    sensitivity: float | None
    sensitivity_ci95: tuple[float, float]
    specificity: float | None
    specificity_ci95: tuple[float, float]
    note: str  # "" when both intervals are within +-0.10; else how many cases it would need
    positives_needed: int = 0  # for a sensitivity interval within +-0.10 (0: enough)
    negatives_needed: int = 0


# a version's labels, by how they were acquired (docs/CONTRACTS.md "How labels were acquired")
ORDER_RANDOM = "random order"  # every label with a known order was served before a model ordered the queue
ORDER_ACTIVE = "active learning"  # some labels were served in a model's uncertainty order
ORDER_UNKNOWN = "order not recorded"


@dataclass(frozen=True)
class LearningPoint:
    version: str
    label_count: int
    created_at: str
    mean_auroc: float | None
    auroc: Mapping[str, float | None]
    oof_sensitivity: Mapping[str, float | None]
    verdicts: Mapping[str, str]
    current: bool
    acquisition: Mapping[str, int] = field(default_factory=dict)  # AcquisitionOrder value -> labels (card)
    order: str = ORDER_UNKNOWN  # ORDER_RANDOM | ORDER_ACTIVE | ORDER_UNKNOWN

    @property
    def model_ordered_share(self) -> float | None:
        known = sum(v for k, v in self.acquisition.items() if k != AcquisitionOrder.UNKNOWN.value)
        return self.acquisition.get(AcquisitionOrder.MODEL.value, 0) / known if known else None


@dataclass(frozen=True)
class AuditRow:
    manufacturer: str
    header_field: str  # "magnification", "spot compression", "biopsy image type"
    cls: str  # the class the model decides it by
    images: int
    header_yes_model_no: int
    header_no_model_yes: int
    both_yes: int


@dataclass(frozen=True)
class Thumb:
    task_id: int
    key: str
    view: str
    kind: str  # "flagged" | "uncertain"
    cls: str
    probability: float
    threshold: float


@dataclass(frozen=True)
class CohortSummary:
    studies: int
    flagged: Mapping[str, int]
    flagged_by_human: Mapping[str, int]
    reliable: Mapping[str, bool]
    model_version: str
    model_variant: str = ""  # int8 | fp32: which served file flagged it
    shift: ShiftTest | None = None  # its images' novelty against the validation's (mammoflag.novelty)


@dataclass(frozen=True)
class Report:
    project: str
    generated_at: str
    classes: tuple[str, ...]
    judged_version: str | None
    tasks_read: int
    label_status: Mapping[str, int]
    agreement: Mapping[str, ClassAgreement]
    calibration: tuple[OofCalibrationRow, ...]  # from every version's card (out of fold)
    subgroups: tuple[SubgroupRow, ...]
    subgroup_images: int
    learning: tuple[LearningPoint, ...]
    audit: tuple[AuditRow, ...]
    audit_source: str
    thumbs: tuple[Thumb, ...]
    cohort: CohortSummary | None = None
    notes: tuple[str, ...] = ()
    calibration_missing: tuple[str, ...] = ()  # versions whose card has no out-of-fold reliability, and why
    held_out_calibration: tuple[CalibrationRow, ...] = ()  # re-scored on images read after each version
    learning_orders: str = ""  # which acquisition orders the learning curve has, in words


def _in_order(scores: Scores, records: Sequence[TaskRecord]) -> list[TaskRecord]:
    """The records of ``scores``' rows, in its order."""
    by_id = {r.task_id: r for r in records}
    return [by_id[t] for t in scores.task_ids]


def calibration_rows(version: VersionInfo, held_out: Sequence[TaskRecord], scores: Scores) -> list[CalibrationRow]:
    spec = version.card.spec
    by_id = {t: i for i, t in enumerate(scores.task_ids)}
    rows = [r for r in held_out if r.task_id in by_id]
    if not rows:
        return []
    z = scores.logits[[by_id[r.task_id] for r in rows]]
    y = targets_of(rows, spec.classes)
    served = calibrated(z, version, rows)  # temperature and header evidence, as served
    oof = version.card.metrics.out_of_fold
    out = []
    for k, c in enumerate(spec.classes):
        t = float(spec.temperatures.get(c, 1.0))
        oof_c = oof.per_class.get(c) if oof else None
        out.append(CalibrationRow(version.name, c, len(rows), int(y[:, k].sum()), t,
                                  reliability_curve(sigmoid(z[:, k]), y[:, k]),
                                  reliability_curve(served[:, k], y[:, k]),
                                  oof_c.ece if oof_c else None))
    return out


def oof_calibration_rows(version: VersionInfo) -> tuple[list[OofCalibrationRow], str | None]:
    """The card's out-of-fold reliability per class; (rows, why none) — nothing is re-scored here."""
    card = version.card
    oof = card.metrics.out_of_fold
    if oof is None:
        return [], f"{version.name}: its card has no out-of-fold estimate (too few validation patients, or a " \
                   "model nobody trained)"
    if not oof.reliability:
        return [], f"{version.name}: its card predates the out-of-fold reliability diagram (retrain to record it)"
    split = (f"out of fold: {sum(oof.fold_sizes)} validation images in {oof.folds} folds {oof.split} "
             f"({'/'.join(str(n) for n in oof.fold_sizes)}), each scored with the temperature fitted on the others")
    rows = []
    for c in card.spec.classes:
        rel, dm = oof.reliability.get(c), oof.per_class.get(c)
        if rel is None:
            continue
        positives = dm.confusion.tp + dm.confusion.fn if dm else 0
        rows.append(OofCalibrationRow(version.name, c, split, rel.after.n, positives,
                                      float(card.spec.temperatures.get(c, 1.0)), rel.temperatures, rel.before,
                                      rel.after))
    return rows, None


def subgroup_rows(grouping: str, labels: Sequence[str], probs: np.ndarray, targets: np.ndarray,
                  classes: Sequence[str], thresholds: Mapping[str, float]) -> list[SubgroupRow]:
    out = []
    values = np.asarray(labels)
    for value in sorted(set(labels)):
        rows = values == value
        for k, c in enumerate(classes):
            y = targets[rows, k] > 0.5
            flagged = probs[rows, k] >= thresholds.get(c, 0.5)
            tp, fn = int((flagged & y).sum()), int((~flagged & y).sum())
            tn, fp = int((~flagged & ~y).sum()), int((flagged & ~y).sum())
            sens = tp / (tp + fn) if tp + fn else None
            spec_ = tn / (tn + fp) if tn + fp else None
            s_ci, p_ci = wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp)
            notes, need_pos, need_neg = [], 0, 0
            if (s_ci[1] - s_ci[0]) / 2 > HALF_WIDTH_WANTED:
                need_pos = positives_for_half_width(sens, HALF_WIDTH_WANTED)
                notes.append(f"too few positives ({tp + fn}) for a sensitivity interval within +-0.10: "
                             f"needs about {need_pos} positives")
            if (p_ci[1] - p_ci[0]) / 2 > HALF_WIDTH_WANTED:
                need_neg = positives_for_half_width(spec_, HALF_WIDTH_WANTED)
                notes.append(f"too few negatives ({tn + fp}) for a specificity interval within +-0.10: "
                             f"needs about {need_neg} negatives")
            out.append(SubgroupRow(grouping, str(value), c, int(rows.sum()), tp + fn, tn + fp, sens, s_ci, spec_,
                                   p_ci, "; ".join(notes), need_pos, need_neg))
    return out


def order_of(acquisition: Mapping[str, int]) -> str:
    """A version's series on the learning curve: active learning when any of its labels was served in a
    model's order, random order when every label of known order came before any model (or uniform sampling)."""
    if acquisition.get(AcquisitionOrder.MODEL.value, 0) > 0:
        return ORDER_ACTIVE
    if acquisition.get(AcquisitionOrder.RANDOM.value, 0) > 0:
        return ORDER_RANDOM
    return ORDER_UNKNOWN


def learning_points(versions: Sequence[VersionInfo]) -> list[LearningPoint]:
    points = []
    for v in versions:
        card = v.card
        oof = card.metrics.out_of_fold
        acq = dict(card.data.acquisition.counts) if card.data.acquisition else {}
        points.append(LearningPoint(
            v.name, card.label_count, card.created_at, card.metrics.mean_auroc,
            {c: (cm.auroc if (cm := card.metrics.per_class.get(c)) else None) for c in card.spec.classes},
            {c: (dm.sensitivity if oof and (dm := oof.per_class.get(c)) else None) for c in card.spec.classes},
            {c: card.verdict(c).value for c in card.spec.classes}, v.current, acq, order_of(acq)))
    return sorted(points, key=lambda p: (p.label_count, p.created_at))


def learning_orders(points: Sequence[LearningPoint]) -> str:
    """What the learning curve can compare, in words; plain when only one order exists."""
    n = Counter(p.order for p in points)
    if not points:
        return "no registered version"
    if n[ORDER_ACTIVE] and n[ORDER_RANDOM]:
        return (f"both orders exist: {n[ORDER_RANDOM]} version(s) trained only on labels served in random order "
                f"(before any model ordered the queue, or uniform sampling) and {n[ORDER_ACTIVE]} trained with labels "
                "served in a model's uncertainty order. Versions of one project are not a controlled comparison: the "
                "active-learning versions also hold the earlier random-order labels (their share is shown)"
                + (f"; {n[ORDER_UNKNOWN]} version(s) do not record the order" if n[ORDER_UNKNOWN] else ""))
    only = ORDER_ACTIVE if n[ORDER_ACTIVE] else ORDER_RANDOM if n[ORDER_RANDOM] else None
    unknown = f"{n[ORDER_UNKNOWN]} version(s) do not record how their labels were acquired" if n[ORDER_UNKNOWN] else ""
    if only is None:
        return f"no comparison of active learning against random order: {unknown}"
    return (f"only {only} exists ({n[only]} version(s)): no comparison of active learning against random order can "
            "be drawn from this registry" + (f"; {unknown}" if unknown else ""))


# header field -> the class that says the same thing
HEADER_CLASSES = (("magnification", "mag_view"), ("spot compression", "mag_view"), ("biopsy image type", "biopsy_tool"))


def _header_value(h: HeaderSays, name: str) -> bool:
    return {"magnification": h.magnification, "spot compression": h.spot_compression,
            "biopsy image type": h.biopsy_image}[name]


def audit_rows(images: Sequence[AuditImage], classes: Sequence[str]) -> list[AuditRow]:
    """Header against model per manufacturer: where the header says mag / spot / biopsy and the model does
    not, and the reverse (the audit the header-only prototype was built to replace)."""
    tally: dict[tuple[str, str, str], Counter] = {}
    for img in images:
        for field_name, cls in HEADER_CLASSES:
            if cls not in classes or cls not in img.model_flags:
                continue
            h, m = _header_value(img.header, field_name), img.model_flags[cls]
            for manufacturer in (img.manufacturer, "(all)"):
                t = tally.setdefault((manufacturer, field_name, cls), Counter())
                t["images"] += 1
                t["h_not_m"] += int(h and not m)
                t["m_not_h"] += int(m and not h)
                t["both"] += int(h and m)
    return [AuditRow(man, f, c, t["images"], t["h_not_m"], t["m_not_h"], t["both"])
            for (man, f, c), t in sorted(tally.items(), key=lambda kv: (kv[0][0] == "(all)", kv[0]))]


def thumbs_for(records: Sequence[TaskRecord], probs: np.ndarray, classes: Sequence[str],
               thresholds: Mapping[str, float], per_kind: int = 6) -> list[Thumb]:
    """The most confidently flagged images, and the most uncertain others (by the judged version)."""
    if not len(records):
        return []
    th = np.array([thresholds.get(c, 0.5) for c in classes])
    out = []
    margin = probs - th
    flagged = [(float(margin[i].max()), i) for i in range(len(records)) if (margin[i] >= 0).any()]
    for _, i in sorted(flagged, reverse=True)[:per_kind]:
        k = int(np.argmax(margin[i]))
        out.append(Thumb(records[i].task_id, records[i].key, records[i].view, "flagged", classes[k], float(probs[i, k]),
                         float(th[k])))
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    shown = {i for _, i in sorted(flagged, reverse=True)[:per_kind]}
    unsure = [int(i) for i in np.argsort(-entropy.max(axis=1), kind="stable")
              if int(i) not in shown and entropy[i].max() >= UNCERTAIN_BITS]
    for i in unsure[:per_kind]:
        k = int(np.argmax(entropy[i]))
        out.append(Thumb(records[i].task_id, records[i].key, records[i].view, "uncertain", classes[k],
                         float(probs[i, k]), float(th[k])))
    return out


def build_report(project: str, records: Sequence[TaskRecord], versions: Sequence[VersionInfo], scorer: Scorer,
                 judged: str | None = None, cohort_images: Sequence[AuditImage] | None = None,
                 cohort: CohortSummary | None = None, resamples: int = DEFAULT_RESAMPLES,
                 now: datetime | None = None) -> Report:
    """Every figure of the report. ``scorer`` runs a version on records (the only model call)."""
    by_name = {v.name: v for v in versions}
    judged_v = by_name.get(judged) if judged else next((v for v in versions if v.current), None)
    if judged_v is None and versions:
        judged_v = max(versions, key=lambda v: v.card.created_at)
    classes = tuple(judged_v.card.spec.classes) if judged_v else ()
    notes = []
    if judged_v is None:
        notes.append("no model version is registered: model figures are left out")

    judged_scores: Scores | None = None
    scored_records: list[TaskRecord] = []
    model_sets: list[frozenset[str] | None] = [None] * len(records)
    if judged_v is not None:
        scored_records = [r for r in records if r.image is not None]
        judged_scores = scorer(judged_v, scored_records)
        probs_all = calibrated(judged_scores.logits, judged_v, _in_order(judged_scores, records))
        th = judged_v.card.spec.thresholds
        by_id = {t: i for i, t in enumerate(judged_scores.task_ids)}
        for j, r in enumerate(records):
            i = by_id.get(r.task_id)
            if i is not None:
                model_sets[j] = frozenset(c for k, c in enumerate(classes) if probs_all[i, k] >= th.get(c, 0.5))

    agreement_classes = classes or ()
    agreement = class_agreement([r.reads for r in records], agreement_classes, model_sets, resamples)

    calibration: list[OofCalibrationRow] = []
    calibration_missing: list[str] = []
    for v in versions:
        rows, why = oof_calibration_rows(v)
        calibration.extend(rows)
        if why:
            calibration_missing.append(why)
    held_calibration: list[CalibrationRow] = []
    for v in versions:
        held = held_out_for(v, records)
        if not held:
            continue
        s = judged_scores if (judged_scores is not None and judged_v is not None and v.name == judged_v.name) \
            else scorer(v, held)
        held_calibration.extend(calibration_rows(v, held, s))

    subgroups: list[SubgroupRow] = []
    subgroup_n = 0
    audit: list[AuditRow] = []
    thumbs: list[Thumb] = []
    audit_source = "no model version"
    if judged_v is not None and judged_scores is not None:
        spec = judged_v.card.spec
        by_id = {t: i for i, t in enumerate(judged_scores.task_ids)}
        held = [r for r in held_out_for(judged_v, records) if r.task_id in by_id]
        subgroup_n = len(held)
        if held:
            p = calibrated(judged_scores.logits[[by_id[r.task_id] for r in held]], judged_v, held)
            y = targets_of(held, classes)
            subgroups += subgroup_rows("site", [r.site for r in held], p, y, classes, spec.thresholds)
            subgroups += subgroup_rows("manufacturer / model", [f"{r.manufacturer} / {r.device_model}" for r in held],
                                       p, y, classes, spec.thresholds)
        else:
            notes.append(f"no image was read after {judged_v.name} was made: no held-out subgroup figures yet")
        probs_all = calibrated(judged_scores.logits, judged_v, _in_order(judged_scores, records))
        if cohort_images is not None:
            audit = audit_rows(cohort_images, classes)
            audit_source = f"the flagged cohort's images.csv ({len(cohort_images)} images)"
        else:
            recs = [r for r in scored_records if r.task_id in by_id]
            imgs = [AuditImage(r.manufacturer, r.header,
                               {c: bool(probs_all[by_id[r.task_id], k] >= spec.thresholds.get(c, 0.5))
                                for k, c in enumerate(classes)}) for r in recs]
            audit = audit_rows(imgs, classes)
            audit_source = f"{judged_v.name} on the project's {len(imgs)} read images"
        thumbs = thumbs_for([scored_records[i] for i in range(len(scored_records))],
                            probs_all[[by_id[r.task_id] for r in scored_records]], classes, spec.thresholds)

    status = Counter(r.resolution.status.value for r in records)
    learning = learning_points(versions)
    return Report(
        project=project, generated_at=(now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC"),
        classes=classes, judged_version=judged_v.name if judged_v else None, tasks_read=len(records),
        label_status={s.value: status.get(s.value, 0) for s in LabelStatus if s is not LabelStatus.UNLABELLED},
        agreement=agreement, calibration=tuple(calibration), subgroups=tuple(subgroups), subgroup_images=subgroup_n,
        learning=tuple(learning), audit=tuple(audit), audit_source=audit_source,
        thumbs=tuple(thumbs), cohort=cohort, notes=tuple(notes), calibration_missing=tuple(calibration_missing),
        held_out_calibration=tuple(held_calibration), learning_orders=learning_orders(learning))


def calibrated(logits: np.ndarray, version: VersionInfo, records: Sequence[TaskRecord]) -> np.ndarray:
    """As served: the one calibration rule of mammoflag.inference, with each record's header evidence
    (``records`` are the rows of ``logits``, in order)."""
    probs = calibrated_probabilities(logits, version.card.spec, evidence_matrix(r.evidence for r in records))
    return probs.reshape(len(logits), len(version.card.spec.classes))


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
