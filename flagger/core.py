"""Cohort flagging: the pure core behind ``mammoflag flag``.

``flag_cohort`` streams the input's work units past the checkpoint (skipping what this
model already did), classifies the rest (locally: decode processes feeding batched ONNX
inference; distributed: Celery shards), appends every finished unit to the checkpoint,
and finally writes flags.csv / images.csv / the errors file from the checkpoint. Nothing
proportional to the cohort's size is ever held in memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from flagger.checkpoint import Checkpoint
from flagger.labels import HumanLabels
from flagger.outputs import write_outputs
from flagger.records import UnitKind, UnitResult, WorkUnit
from flagger.reliability import ClassSelection, select_classes, unvalidated_manufacturers
from flagger.sources import DicomWebInput, FlagInput, PrepareContext, count_units, input_kind, iter_units
from label_config import LabelConfig
from mammoflag.card import UNKNOWN_MANUFACTURER
from mammoflag.fileio import PARTIAL_SUFFIX
from mammoflag.novelty import ShiftTest, cohort_shift
from mammoflag.registry import INT8_FILE, ModelVersion

log = logging.getLogger(__name__)

# A function that classifies pending units elsewhere (Celery shards) and yields finished units.
RemoteRunner = Callable[[Iterable[WorkUnit], "FlagJob"], Iterator[list[UnitResult]]]


@dataclass(frozen=True)
class FlagOutputs:
    flags: Path
    images: Path | None = None
    errors: Path | None = None  # default: <flags stem>.errors.csv beside flags.csv
    checkpoint: Path | None = None  # default: <flags stem>.checkpoint.sqlite beside flags.csv

    @property
    def errors_path(self) -> Path:
        return self.errors or self.flags.with_name(f"{self.flags.stem}.errors.csv")

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint or self.flags.with_name(f"{self.flags.stem}.checkpoint.sqlite")


@dataclass(frozen=True)
class FlagOptions:
    workers: int | None = None  # decode processes (0: in this process; None: per input kind, see decode_workers_for)
    batch_size: int = 32  # images per ONNX Runtime call
    ort_threads: int | None = None  # ONNX Runtime threads (None: one per core, not spinning beside decoders)
    prefer_int8: bool = True  # the registry's INT8 model when it kept one
    display_long_side: int = 1024  # display image size for DICOM input (the importer's setting)
    progress: bool = True
    dicomweb: DicomWebInput | None = None  # set by flag_cohort for a DICOMweb archive


@dataclass(frozen=True)
class FlagJob:
    """What a remote runner needs to classify units exactly as this run would."""

    input_path: FlagInput  # a folder, or a DICOMweb archive (its units carry their instance URLs)
    input_kind: UnitKind
    model_path: Path
    model_file: str  # model.onnx or model.int8.onnx: the remote side must load the same one
    model_version: str
    checkpoint_path: Path
    batch_size: int
    display_long_side: int


@dataclass
class FlagSummary:
    model_version: str
    model_file: str
    input_kind: UnitKind
    units_total: int
    units_done_before: int  # finished by an earlier run with this model (resume)
    units_processed: int = 0
    images_stored: int = 0
    studies: int = 0
    images: int = 0
    problems: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    flagged_by_human: dict[str, int] = field(default_factory=dict)
    human_labelled_images: int = 0
    human_labels_loaded: int = 0
    elapsed_s: float = 0.0
    outputs: FlagOutputs | None = None
    # studies per manufacturer the card's validation holds no image of (reliability.unvalidated_manufacturers)
    unvalidated: dict[str, int] = field(default_factory=dict)
    shift: ShiftTest | None = None  # this run's images against the validation's (mammoflag.novelty.cohort_shift)
    novel_by_manufacturer: dict[str, tuple[int, int]] = field(default_factory=dict)  # (beyond, scored) images

    @property
    def images_per_s(self) -> float:
        return self.images_stored / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"model {self.model_version} ({self.model_file}); input: {self.input_kind}",
            f"units: {self.units_total} in input, {self.units_done_before} already done, "
            f"{self.units_processed} processed now ({self.images_stored} images, {self.images_per_s:.1f} images/s)",
            f"studies: {self.studies} ({self.images} images, {self.human_labelled_images} with a human label; "
            f"{self.human_labels_loaded} human labels loaded)",
        ]
        for cls, n in self.flagged.items():
            lines.append(f"  flagged {cls}: {n} studies ({self.flagged_by_human.get(cls, 0)} by a human label)")
        lines.append(f"failures/skips: {self.problems}" + (f" (see {self.outputs.errors_path.name})"
                                                          if self.outputs and self.problems else ""))
        if self.unvalidated:
            makers = ", ".join(f"{m or UNKNOWN_MANUFACTURER}: {n}" for m, n in self.unvalidated.items())
            lines.append(f"warning: {sum(self.unvalidated.values())} of {self.studies} studies come from manufacturers "
                         f"the model was never validated on ({makers}); the trust gate's verdicts do not speak for "
                         "them: label some of their images and retrain before trusting their flags")
        if self.shift is not None:
            lines.append(("warning: " if self.shift.shifted else "novelty: ") + self.shift.explain())
            if self.shift.shifted and self.novel_by_manufacturer:
                worst = sorted(self.novel_by_manufacturer.items(), key=lambda kv: (-kv[1][0] / kv[1][1], kv[0]))
                lines.append("  images beyond, by manufacturer: " + ", ".join(
                    f"{m or UNKNOWN_MANUFACTURER} {beyond}/{scored}" for m, (beyond, scored) in worst[:6]))
        return "\n".join(lines)


def flag_cohort(input_path: FlagInput, version: ModelVersion, outputs: FlagOutputs, *,
                label_config: LabelConfig | None = None, human_labels: HumanLabels | None = None,
                options: FlagOptions = FlagOptions(), patient_key_secret: str | None = None,
                remote: RemoteRunner | None = None, selection: ClassSelection | None = None) -> FlagSummary:
    """Flag every study of a cohort; resumable; returns what was done.

    ``selection`` says which classes get flags (default: the classes the model card's trust gate
    says are learned; :class:`~flagger.reliability.UnreliableClass` when there are none).
    """
    started = time.monotonic()
    if isinstance(input_path, DicomWebInput):
        options = replace(options, dicomweb=input_path)  # the decode processes retrieve from it
    else:
        input_path = Path(input_path).resolve()
    kind = input_kind(input_path)
    spec = version.spec
    if label_config is not None:
        spec.check_compatible(label_config)
    if selection is None:
        selection, _ = select_classes(version.card)
    model_file = version.model_file(options.prefer_int8)
    model_key = f"{version.name}/{model_file.name}"
    _sweep_partial_outputs(outputs)

    with Checkpoint(outputs.checkpoint_path) as ckpt:
        ckpt.bind(str(input_path), spec.classes)
        ckpt.forget_failures(model_key)
        if human_labels is not None:
            ckpt.replace_human_labels(human_labels.labels.items())
        else:
            ckpt.replace_human_labels([])
        units_total = count_units(input_path)
        done_before = ckpt.count_done(model_key)
        summary = FlagSummary(version.name, model_file.name, kind, units_total, done_before,
                              human_labels_loaded=len(human_labels.labels) if human_labels else 0, outputs=outputs)
        listed = _Counted(iter_units(input_path))
        pending = _pending_units(listed, ckpt, model_key)

        if remote is not None:
            job = FlagJob(input_path, kind, version.path.resolve(), model_file.name, version.name,
                          outputs.checkpoint_path.resolve(), options.batch_size, options.display_long_side)
            batches = remote(pending, job)
        else:
            batches = _local_batches(pending, version, options, kind, patient_key_secret)

        progress = _progress_bar(max(0, units_total - done_before) if kind is not UnitKind.DICOMWEB else None, kind,
                                 options.progress)
        try:
            for results in batches:
                stored, _ = ckpt.add_results(model_key, results)
                summary.units_processed += len(results)
                summary.images_stored += stored
                progress.update(len(results))
        finally:
            progress.close()
        summary.elapsed_s = time.monotonic() - started
        if kind is UnitKind.DICOMWEB:
            summary.units_total = listed.count  # a streamed listing: known once it is through

        variant = "int8" if model_file.name == INT8_FILE else "fp32"
        counts, problems = write_outputs(ckpt, model_key, spec, version.name, variant,
                                         outputs.flags, outputs.images, outputs.errors_path, selection)
    summary.studies, summary.images, summary.problems = counts.studies, counts.images, problems
    summary.human_labelled_images = counts.human_labelled_images
    summary.flagged = {c: counts.flagged.get(c, 0) for c in spec.classes if c in selection.flagged}
    summary.flagged_by_human = {c: counts.flagged_by_human.get(c, 0) for c in spec.classes}
    summary.unvalidated = unvalidated_manufacturers(version.card, counts.manufacturers)
    summary.shift = cohort_shift(version.path, model_file.name, counts.novelty_images, counts.novel_images,
                                 counts.novelty_study_means)
    summary.novel_by_manufacturer = {m: (counts.novel_by_manufacturer[m], n)
                                     for m, n in sorted(counts.novelty_by_manufacturer.items()) if n}
    return summary


def _sweep_partial_outputs(outputs: FlagOutputs) -> None:
    """Remove the ``<output>.<token>.partial`` files a killed run left beside flags.csv and the others."""
    for path in (outputs.flags, outputs.images, outputs.errors_path):
        if path is not None and Path(path).parent.is_dir():
            for leftover in Path(path).parent.glob(f"{Path(path).name}.*{PARTIAL_SUFFIX}"):
                leftover.unlink(missing_ok=True)


def _local_batches(pending: Iterable[WorkUnit], version: ModelVersion, options: FlagOptions, kind: UnitKind,
                   patient_key_secret: str | None) -> Iterator[list[UnitResult]]:
    from flagger.pipeline import classified_batches, prepared_units
    from mammoflag.inference import OnnxClassifier

    workers = decode_workers_for(options, kind)
    classifier = OnnxClassifier(version, prefer_int8=options.prefer_int8, threads=ort_threads_for(options),
                                spin=workers <= 0)
    ctx = PrepareContext(version.spec.input_size, options.display_long_side,
                         patient_key_secret if kind in (UnitKind.DICOM, UnitKind.DICOMWEB) else None,
                         dicomweb=options.dicomweb)
    # decoding runs three batches ahead: one being classified, two ready (see prepared_units)
    prepared = prepared_units(pending, ctx, workers, prefetch_units=3 * options.batch_size)
    yield from classified_batches(prepared, classifier, options.batch_size)


def decode_workers_for(options: FlagOptions, kind: UnitKind | str) -> int:
    """Decode processes: as asked, else one per core, at most 4 for DICOM input and 2 for a DATA_DIR.

    Measured on 2 idle cores (benchmarks/bench_flagger.py --sweep): a full-field DICOM costs
    ~28 CPU ms to normalize against ~12 ms of INT8 inference, so one decoder starves the model
    (32-35 img/s) and two keep it fed (46-48 img/s); a display PNG costs ~6 ms and a second
    decoder still adds ~10 % (90-103 -> 105-107 img/s). Each decoder holds ~100 MB (a DICOM
    decoder up to ~230 MB while it holds a full-field frame), so the caps keep a run under 1 GB
    resident on a many-core machine; the ONNX session uses every core either way.
    """
    if options.workers is not None:
        return options.workers
    cores = os.cpu_count() or 1
    return min(cores, 4 if kind in (UnitKind.DICOM, UnitKind.DICOMWEB) else 2)


def ort_threads_for(options: FlagOptions) -> int:
    """ONNX Runtime threads: as asked, else one per core.

    Measured on 2 cores (benchmarks/bench_flagger.py): beside a decode process, ORT's idle
    threads busy-wait on the core the decoder needs (~27 CPU ms per image instead of ~20),
    so with decode processes the session is made with spinning off (see _local_batches):
    ORT then uses both cores while the decoder sleeps, and yields them while it works.
    """
    return options.ort_threads or (os.cpu_count() or 1)


class _Counted:
    """An iterator that counts what went through it."""

    def __init__(self, items: Iterable[WorkUnit]):
        self._items = iter(items)
        self.count = 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> WorkUnit:
        item = next(self._items)
        self.count += 1
        return item


def _pending_units(units: Iterable[WorkUnit], ckpt: Checkpoint, model_key: str) -> Iterator[WorkUnit]:
    """The units this model has not finished, looked up in chunks (never a set of the whole cohort)."""
    it = iter(units)
    while chunk := list(itertools.islice(it, 500)):
        done = ckpt.done_units(model_key, [u.unit_id for u in chunk])
        yield from (u for u in chunk if u.unit_id not in done)


def _progress_bar(total: int | None, kind: UnitKind, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img" if kind is UnitKind.DISPLAY else "file", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1, desc="flagging")
