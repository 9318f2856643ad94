"""Assemble a version's :class:`~mammoflag.card.ModelCard` and say it in words.

``card_summary`` is what ``mammoflag train`` prints: the verdict of each class first, in words
(the research lead's first question is "can I use these flags?"), then the figures.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from mammoflag.card import (Acquisition, AcquisitionOrder, DataSection, Int8Section, LeftOut, ModelCard,
                            PromotionSection, SplitInfo, TrainingSection, TrustGate, ValidationMetrics, Verdict,
                            acquisition_order, first_current_at)
from mammoflag.registry import ModelVersion, Registry
from mammoflag.spec import ModelSpec
from training.calibrate import HEADER_MIN_AUROC
from training.dataset import SPLIT_SALT, LabelledSet
from training.export import Int8Outcome
from training.promotion import Promotion

MAX_LEFT_OUT_IN_CARD = 500
METRICS_NOTE = ("per_class: on the validation images the temperatures and thresholds were fitted on (optimistic for "
                "sensitivity, specificity and ECE; AUROC is unaffected); out_of_fold: each half of the validation "
                "patients scored with the calibration fitted on the other")
_TRAINING_KEYS = ("mode", "lr", "lr_source")


def acquisition_of(labelled: LabelledSet, parent: ModelVersion | None, project_id: int | None,
                   left_out: Sequence[LeftOut] = ()) -> Acquisition:
    """How the images training used were acquired (``mammoflag.card.ACQUISITION_RULE``).

    When a model of the project first became current is read from the registry the parent lives in (no
    current version: none ever was); images left out while loading are not counted."""
    cards = [v.card for v in Registry(parent.path.parent).versions()] if parent is not None else []
    since = first_current_at(cards, project_id)
    gone = {g.key for g in left_out}
    counts = Counter(acquisition_order(i.first_read_at, labelled.sampling, since).value
                     for i in labelled.items if i.key not in gone)
    return Acquisition({o.value: counts.get(o.value, 0) for o in AcquisitionOrder}, labelled.sampling, since)


def build_card(labelled: LabelledSet, spec: ModelSpec, metrics: ValidationMetrics, trust: TrustGate,
               int8: Int8Outcome, promotion: Promotion, parent: ModelVersion | None, left_out: Sequence[LeftOut],
               n_train: int, n_valid: int, valid_fraction: float, config: Any, fit_info: Mapping[str, Any],
               body_from: str, max_diff: float, timings: Mapping[str, float], threads: int,
               source: Mapping[str, Any] | None) -> ModelCard:
    source = dict(source or {})
    mode = str(fit_info.get("mode", "fine_tune"))
    labels = n_train + n_valid
    parent_full = parent.card.training.full_fine_tune_labels if parent else 0
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return ModelCard(
        spec=spec,
        metrics=metrics,
        trust=trust,
        int8=Int8Section(int8.kept, int8.reason, int8.fp32_mean_auroc, int8.int8_mean_auroc, int8.max_auroc_drop),
        promotion=PromotionSection(promotion.become_current, promotion.reason, promotion.new_mean_auroc,
                                   promotion.current_mean_auroc, promotion.compared_with),
        data=DataSection(
            source=labelled.source, annotations=labelled.annotations, max_annotation_id=labelled.max_annotation_id,
            unlabelled_tasks=labelled.unlabelled, left_out_count=len(left_out),
            split=SplitInfo("patient_key (study when absent)", SPLIT_SALT, valid_fraction, n_train, n_valid),
            reader_agreement=labelled.reader_agreement,
            left_out=tuple(list(left_out)[:MAX_LEFT_OUT_IN_CARD]),
            project_id=source.get("project_id"), export=source.get("export"), run=source.get("run"),
            acquisition=acquisition_of(labelled, parent, source.get("project_id"), left_out)),
        training=TrainingSection(
            mode=mode, body_from=body_from, timings_s=dict(timings),
            # labels the body was last fully trained on: what 'auto' compares growth against
            full_fine_tune_labels=labels if mode == "fine_tune" else parent_full,
            onnx_parity_max_diff=max_diff, torch_weights="model.pt", cpu_threads=threads,
            lr=fit_info.get("lr"), lr_source=fit_info.get("lr_source"), config=config_json,
            details={k: v for k, v in fit_info.items() if k not in _TRAINING_KEYS}),
        label_count=labels,
        label_counts=labelled.label_counts(),
        data_fingerprint=labelled.fingerprint,
        parent_version=parent.name if parent else None,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        metrics_note=METRICS_NOTE,
    )


def verdict_lines(card: ModelCard) -> list[str]:
    """One sentence per class: can its flags be used?"""
    lines = []
    for c in card.spec.classes:
        verdict = card.verdict(c)
        use = {Verdict.LEARNED: "its flags can be used",
               Verdict.INSUFFICIENT_EVIDENCE: "not flagged by default: label more images",
               Verdict.NOT_LEARNED: "not flagged by default: the model has not learned it"}[verdict]
        lines.append(f"{card.explain(c)} -> {use}")
    return lines


def card_summary(card: ModelCard) -> str:
    """Verdicts first, then version, metrics per class, INT8, whether it became current and why."""
    lines = ["verdicts:", *(f"  {line}" for line in verdict_lines(card))]
    lines.append(f"version {card.version}  labels {card.label_count}  ({card.data.left_out_count} left out, "
                 f"{card.data.unlabelled_tasks} unlabelled)  parent {card.parent_version or '-'}")
    m = card.metrics
    for c, cm in m.per_class.items():
        lo, hi = cm.sensitivity_ci95
        lines.append(f"  {c:<12} AUROC {_f(cm.auroc, 3)}  sens {_f(cm.sensitivity)} [{lo:.2f}-{hi:.2f}]  "
                     f"spec {_f(cm.specificity)}  threshold {cm.threshold:.3f}  T {card.spec.temperatures[c]:.2f}  "
                     f"ECE {cm.ece:.3f}")
    lines.append(f"  mean AUROC {_f(m.mean_auroc, 4)}  on {m.n_valid} validation images")
    header_auroc = card.training.details.get("header_auroc") or {}
    for c in card.spec.classes:
        weights = card.spec.header_weights.get(c, ())
        said = [f"{name} {w:+.2f}" for name, w in zip(card.spec.header_features, weights) if abs(w) >= 0.05]
        alone = f"the header alone ranks it at AUROC {_f(header_auroc.get(c))}" if c in header_auroc else ""
        if said:
            lines.append(f"  {c:<12} header evidence ({alone}), added to the calibrated logit: {', '.join(said)}")
        elif alone:
            lines.append(f"  {c:<12} no header evidence: {alone} (weights need >= {HEADER_MIN_AUROC})")
    for c, om in (m.out_of_fold.per_class.items() if m.out_of_fold else ()):
        lo, hi = om.sensitivity_ci95
        lines.append(f"  {c:<12} out of fold: sens {_f(om.sensitivity)} [{lo:.2f}-{hi:.2f}]  "
                     f"spec {_f(om.specificity)}  ECE {om.ece:.3f}")
    for maker, mm in m.by_manufacturer.items():
        parts = [f"{c} AUROC {_f(cm.auroc, 3)}" for c, cm in mm.per_class.items()]
        lines.append(f"  {maker[:24]:<24} n={mm.n:<5} " + "  ".join(parts))
    agreement = card.data.reader_agreement or {}
    if agreement.get("double_read_tasks"):
        parts = [f"{c} kappa {_f(a['fleiss_kappa'])} ({a['tasks_all_agree']}/{a['tasks']} unanimous)"
                 for c, a in agreement["per_class"].items()]
        lines.append(f"  readers: {agreement['double_read_tasks']} double-read tasks; " + "; ".join(parts))
    lines.append(f"  int8: {'kept' if card.int8.kept else 'not kept'} ({card.int8.reason})")
    lines.append(f"  current: {'yes' if card.promotion.became_current else 'no'} ({card.promotion.reason})")
    lines.append(f"  training: {card.training.mode} from {card.training.body_from} in "
                 f"{card.training.timings_s.get('total_s', 0.0):.0f} s")
    return "\n".join(lines)


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
