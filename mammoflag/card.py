"""The model card: a frozen, versioned record of what one model version is and how far to trust it.

Training writes it (``model.json`` in each registry version, beside the ONNX files); the ML
backend, the flagger, the reports and the next retrain read it. Every section is a frozen
dataclass, like :class:`~mammoflag.spec.ModelSpec`, so readers use attributes instead of
guarding string keys. ``schema`` says which layout a file has; older cards still load (a
section they lack comes back as its default, e.g. no trust gate).

The **trust gate** (:class:`TrustGate`) holds a verdict per class, with the figures that
decided it. Only ``learned`` classes are flagged by default; see docs/CONTRACTS.md.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum, StrEnum
from typing import Any, Iterable, Mapping, TypeVar

from mammoflag.spec import ModelSpec
from mammoflag.stats import ReliabilityCurve

CARD_SCHEMA = 2  # 1: the untyped card of mammoflag <= 0.1 (no trust gate)


# -- metrics ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass(frozen=True)
class DecisionMetrics:
    """Decisions at a threshold: sensitivity and specificity with Wilson 95 % intervals, ECE, counts."""

    sensitivity: float | None
    sensitivity_ci95: tuple[float, float]
    specificity: float | None
    specificity_ci95: tuple[float, float]
    ece: float
    confusion: Confusion


@dataclass(frozen=True)
class ClassMetrics(DecisionMetrics):
    auroc: float | None = None
    threshold: float = 0.5
    positives: int = 0
    negatives: int = 0


@dataclass(frozen=True)
class OutOfFoldReliability:
    """One class's reliability diagram on the pooled out-of-fold images (``mammoflag.stats.reliability_curve``).

    ``before``: the network's own confidence, sigmoid(logit); ``after``: each fold's logits divided by the
    temperature fitted on the other folds (``temperatures``, in fold order), as a version would serve images
    its calibration never saw. ``after.ece`` equals the class's out-of-fold ``DecisionMetrics.ece``."""

    before: ReliabilityCurve
    after: ReliabilityCurve
    temperatures: tuple[float, ...]


@dataclass(frozen=True)
class OutOfFold:
    """Each half of the validation patients scored with the calibration fitted on the other half."""

    folds: int
    split: str
    per_class: Mapping[str, DecisionMetrics]
    fold_sizes: tuple[int, ...]
    # per class; empty on cards written before the out-of-fold reliability diagram was recorded
    reliability: Mapping[str, OutOfFoldReliability] = field(default_factory=dict)


# The group of validation images without a Manufacturer in ``ValidationMetrics.by_manufacturer``
UNKNOWN_MANUFACTURER = "(unknown)"


@dataclass(frozen=True)
class GroupMetrics:
    n: int
    per_class: Mapping[str, ClassMetrics]


@dataclass(frozen=True)
class ValidationMetrics:
    per_class: Mapping[str, ClassMetrics]
    mean_auroc: float | None
    mean_ece: float | None
    exact_match_at_threshold: float | None
    n_valid: int
    by_manufacturer: Mapping[str, GroupMetrics] = field(default_factory=dict)
    out_of_fold: OutOfFold | None = None


# -- the trust gate ------------------------------------------------------------------------------

class Verdict(StrEnum):
    LEARNED = "learned"
    INSUFFICIENT_EVIDENCE = "insufficient evidence"
    NOT_LEARNED = "not learned"


@dataclass(frozen=True)
class TrustRule:
    """What ``learned`` means; recorded in every card so a verdict can be re-derived by hand."""

    min_auroc_lower: float = 0.75  # lower end of the 95 % interval of validation AUROC
    confidence: float = 0.95
    bootstrap_resamples: int = 2000  # over patients (the split's groups), not images
    min_positives: int = 10  # fewer validation positives (or negatives) than this: cannot say
    min_negatives: int = 10
    target_sensitivity: float = 0.95

    def describe(self) -> str:
        return (f"learned: the lower {self.confidence:.0%} bound of validation AUROC (bootstrap over patients, "
                f"{self.bootstrap_resamples} resamples) >= {self.min_auroc_lower} and the out-of-fold "
                f"sensitivity at the threshold >= the lower {self.confidence:.0%} Wilson bound of the target "
                f"{self.target_sensitivity} at that many positives; insufficient evidence: fewer than "
                f"{self.min_positives} positive or {self.min_negatives} negative validation images, or no "
                f"out-of-fold estimate; otherwise not learned")


@dataclass(frozen=True)
class ClassTrust:
    verdict: Verdict
    reason: str  # in words, with the figures that decided it
    positives: int
    negatives: int
    auroc: float | None = None
    auroc_ci95: tuple[float, float] | None = None
    oof_sensitivity: float | None = None
    oof_sensitivity_ci95: tuple[float, float] | None = None
    oof_specificity: float | None = None
    sensitivity_floor: float | None = None  # the target's lower bound at this many positives
    more_positives_needed: int = 0
    more_negatives_needed: int = 0

    @property
    def learned(self) -> bool:
        return self.verdict is Verdict.LEARNED


@dataclass(frozen=True)
class TrustGate:
    rule: TrustRule
    per_class: Mapping[str, ClassTrust]

    def verdict(self, cls: str) -> Verdict:
        trust = self.per_class.get(cls)
        return trust.verdict if trust else Verdict.INSUFFICIENT_EVIDENCE

    def learned(self, cls: str) -> bool:
        return self.verdict(cls) is Verdict.LEARNED

    def learned_classes(self) -> tuple[str, ...]:
        return tuple(c for c, t in self.per_class.items() if t.learned)

    def explain(self, cls: str) -> str:
        trust = self.per_class.get(cls)
        if trust is None:
            return f"{cls}: no verdict (this class was not assessed)"
        return f"{cls}: {trust.verdict.value.upper()} ({trust.reason})"


# -- the other sections --------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8Section:
    kept: bool
    reason: str
    fp32_mean_auroc: float | None = None
    int8_mean_auroc: float | None = None
    max_auroc_drop: float | None = None


@dataclass(frozen=True)
class PromotionSection:
    became_current: bool
    reason: str
    new_mean_auroc: float | None = None
    current_mean_auroc: float | None = None
    compared_with: str | None = None


@dataclass(frozen=True)
class LeftOut:
    """A task training could not use, with the reason (names the task id and the field, never a patient)."""

    task_id: int | None
    key: str
    reason: str


@dataclass(frozen=True)
class SplitInfo:
    by: str
    salt: str
    valid_fraction: float
    n_train: int
    n_valid: int


class AcquisitionOrder(StrEnum):
    """How the queue was ordered when a label was made (docs/CONTRACTS.md "How labels were acquired")."""

    MODEL = "model-ordered"  # uncertainty sampling after a model of the project first became current
    RANDOM = "random"  # before that (Label Studio serves unscored tasks at random), or uniform sampling
    SEQUENTIAL = "sequential"  # the project's sampling was sequential
    UNKNOWN = "unknown"  # no time of the first answer, or the sampling is not known (an export)


UNCERTAINTY_SAMPLING = "Uncertainty sampling"  # Label Studio's names of its sampling settings
UNIFORM_SAMPLING = "Uniform sampling"
SEQUENTIAL_SAMPLING = "Sequential sampling"
ACQUISITION_RULE = (
    "model-ordered: the task's first submitted answer is later than the moment a model of this project first "
    "became current (the created_at of the earliest version of the project whose promotion made it current; the "
    "queue follows it once re-prediction has uploaded its scores, seconds to minutes later) and the project uses "
    "uncertainty sampling; random: an earlier first answer under uncertainty sampling (Label Studio serves tasks "
    "without a current prediction at random), or uniform sampling; sequential: sequential sampling; unknown: no "
    "answer time, or a source (an export) whose sampling setting is not known")


def acquisition_order(first_read_at: str | None, sampling: str | None, ordered_since: str | None) -> AcquisitionOrder:
    """The order one label was acquired in (``ACQUISITION_RULE``); times are ISO 8601, compared as instants."""
    if sampling == SEQUENTIAL_SAMPLING:
        return AcquisitionOrder.SEQUENTIAL
    if sampling == UNIFORM_SAMPLING:
        return AcquisitionOrder.RANDOM
    if sampling != UNCERTAINTY_SAMPLING or not first_read_at:
        return AcquisitionOrder.UNKNOWN
    read, since = _instant(first_read_at), _instant(ordered_since) if ordered_since else None
    if read is None:
        return AcquisitionOrder.UNKNOWN
    return AcquisitionOrder.MODEL if since is not None and read > since else AcquisitionOrder.RANDOM


def _instant(value: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Acquisition:
    """How the labels a version was trained on (training + validation images) were acquired."""

    counts: Mapping[str, int]  # AcquisitionOrder value -> labels
    sampling: str | None  # the project's Label Studio sampling setting when it trained; None for an export
    ordered_since: str | None  # when a model of the project first became current (UTC); None: never before
    rule: str = ACQUISITION_RULE

    def count(self, order: AcquisitionOrder) -> int:
        return int(self.counts.get(order.value, 0))


@dataclass(frozen=True)
class DataSection:
    source: str  # "project 3" or "export <file name>"; never a path
    annotations: int
    max_annotation_id: int
    unlabelled_tasks: int
    left_out_count: int
    split: SplitInfo
    reader_agreement: Mapping[str, Any] = field(default_factory=dict)
    left_out: tuple[LeftOut, ...] = ()
    project_id: int | None = None  # the Label Studio project the labels came from
    export: str | None = None  # or the export file's name
    run: str | None = None  # the Celery task id of the retrain that made it
    acquisition: Acquisition | None = None  # None on cards written before it was recorded


@dataclass(frozen=True)
class TrainingSection:
    mode: str
    # "random-init", "pretext[:cached]:<steps>" (tiles; training/pretext.py) and/or "zoom[:cached]:<steps>" (the
    # whole image), joined by "+", "imagenet:<file>", "parent:<version>"
    body_from: str
    timings_s: Mapping[str, float]
    full_fine_tune_labels: int
    onnx_parity_max_diff: float
    torch_weights: str
    cpu_threads: int
    lr: float | None = None
    lr_source: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # what the fit reported beyond the above


@dataclass(frozen=True)
class ModelCard:
    spec: ModelSpec
    metrics: ValidationMetrics
    int8: Int8Section
    promotion: PromotionSection
    data: DataSection
    training: TrainingSection
    label_count: int
    label_counts: Mapping[str, int]
    data_fingerprint: str
    parent_version: str | None
    created_at: str
    metrics_note: str = ""
    trust: TrustGate | None = None  # None on cards written before the trust gate
    version: str = ""  # set by Registry.publish
    schema: int = CARD_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelCard":
        d = dict(d)
        d.setdefault("schema", 1)
        if d["schema"] < 2:
            d = _upgrade_v1(d)
        return from_jsonable(cls, d)

    def verdict(self, cls: str) -> Verdict:
        """A class's verdict; a card without a trust gate has learned nothing it can show."""
        return self.trust.verdict(cls) if self.trust else Verdict.INSUFFICIENT_EVIDENCE

    def learned(self, cls: str) -> bool:
        return self.verdict(cls) is Verdict.LEARNED

    def explain(self, cls: str) -> str:
        if self.trust is None:
            return f"{cls}: no verdict (version {self.version} was trained before the trust gate; retrain it)"
        return self.trust.explain(cls)


def first_current_at(cards: Iterable[ModelCard], project_id: int | None) -> str | None:
    """When a model of this project first became current: the earliest ``created_at`` of a card of the project
    whose promotion made it current (None when none did, or for no project)."""
    if project_id is None:
        return None
    times = [(t, c.created_at) for c in cards if c.data.project_id == project_id and c.promotion.became_current
             and (t := _instant(c.created_at)) is not None]
    return min(times)[1] if times else None


def stand_in_card(spec: ModelSpec, reason: str, parent: str | None = None, int8_kept: bool = False,
                  verdicts: Mapping[str, Verdict] | None = None) -> ModelCard:
    """The card of a model nobody trained (benchmarks, tests): no metrics, verdicts as stated (default learned)."""
    import time

    verdicts = dict(verdicts if verdicts is not None else {c: Verdict.LEARNED for c in spec.classes})
    return ModelCard(
        spec=spec,
        metrics=ValidationMetrics(per_class={}, mean_auroc=None, mean_ece=None, exact_match_at_threshold=None,
                                  n_valid=0),
        trust=TrustGate(TrustRule(), {c: ClassTrust(v, f"stated, not measured: {reason}", 0, 0)
                                      for c, v in verdicts.items()}),
        int8=Int8Section(int8_kept, reason),
        promotion=PromotionSection(True, reason),
        data=DataSection(source=reason, annotations=0, max_annotation_id=0, unlabelled_tasks=0, left_out_count=0,
                         split=SplitInfo("none", "none", 0.2, 0, 0)),
        training=TrainingSection(mode="none", body_from="stand-in", timings_s={}, full_fine_tune_labels=0,
                                 onnx_parity_max_diff=0.0, torch_weights="", cpu_threads=0),
        label_count=0, label_counts={}, data_fingerprint="stand-in", parent_version=parent,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 kept extra keys in ``data`` and ``training``; move the unknown ones into typed slots."""
    training = dict(d.get("training") or {})
    known = {f.name for f in dataclasses.fields(TrainingSection)}
    training["details"] = {k: v for k, v in training.items() if k not in known}
    training.setdefault("timings_s", {})
    training.setdefault("full_fine_tune_labels", 0)
    training.setdefault("onnx_parity_max_diff", 0.0)
    training.setdefault("torch_weights", "")
    training.setdefault("cpu_threads", 0)
    training.setdefault("mode", "fine_tune")
    training.setdefault("body_from", "unknown")
    metrics = dict(d.get("metrics") or {})
    return {**d, "training": training, "metrics": metrics, "schema": CARD_SCHEMA}


# -- JSON for frozen dataclasses -----------------------------------------------------------------

T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
    """Dataclasses to dicts, enums to their values, tuples to lists, mappings to dicts (keys as str)."""
    if isinstance(value, ModelSpec):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def from_jsonable(tp: Any, value: Any) -> Any:
    """The inverse of :func:`to_jsonable` for the annotated type ``tp``; unknown keys are ignored."""
    if tp is Any:
        return value
    if tp is ModelSpec:
        return ModelSpec.from_json(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"null where {tp} is required")
        options = [a for a in args if a is not type(None)]
        return from_jsonable(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ValueError(f"{tp.__name__}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = from_jsonable(hints[f.name], value[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if type(None) in typing.get_args(hints[f.name]):
                    kwargs[f.name] = None
                else:
                    raise ValueError(f"{tp.__name__}: missing field {f.name!r}")
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v) for v in value)
        return tuple(from_jsonable(a, v) for a, v in zip(args, value))
    if origin in (dict, collections.abc.Mapping):
        key_tp, val_tp = args if args else (str, Any)
        return {from_jsonable(key_tp, k): from_jsonable(val_tp, v) for k, v in value.items()}
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    return value
