"""``mammoflag flag`` and ``mammoflag cohort``: thin shells around flagger.core and flagger.cohort."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flag", help="flag a cohort: study-level flags from a DICOM folder or an import DATA_DIR",
        description="Batch ONNX inference to study-level flags; human labels override the model; resumable.")
    p.add_argument("input", help="an import DATA_DIR (has manifest.csv), a folder of DICOM files, or a DICOMweb "
                                 "archive dicomweb+http(s)://HOST/PATH (credentials from MAMMOFLAG_DICOMWEB_*)")
    p.add_argument("--model", type=Path, default=None,
                   help="a registry version folder, or a registry (its current version); default MAMMOFLAG_MODELS_DIR")
    p.add_argument("--out", type=Path, required=True, help="flags.csv: one row per study")
    p.add_argument("--images-out", type=Path, default=None, help="images.csv: one row per image (probabilities, hints)")
    p.add_argument("--errors-out", type=Path, default=None, help="errors file (default: <out stem>.errors.csv)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint database (default: <out stem>.checkpoint.sqlite); re-runs skip what it holds")
    p.add_argument("--labels", default=None, metavar="EXPORT_OR_PROJECT",
                   help="human labels that override the model: a Label Studio JSON export, or a project id/title")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes (0: decode in the main process; default: one per core, "
                        "at most 4 for DICOM input and 2 for a DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call")
    p.add_argument("--ort-threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")
    p.add_argument("--fp32", action="store_true", help="use the fp32 model even when the registry kept an INT8 one")
    p.add_argument("--display-long-side", type=int, default=None,
                   help="display size for DICOM input (default: MAMMOFLAG_DISPLAY_LONG_SIDE, as the importer)")
    p.add_argument("--distributed", action="store_true", help="run shards as Celery tasks on the workers")
    p.add_argument("--shard-size", type=int, default=2000, help="units per distributed shard")
    p.add_argument("--stall-timeout", type=float, default=300.0,
                   help="seconds without a heartbeat before a distributed shard is sent again")
    p.add_argument("--classes", default=None, metavar="C1,C2",
                   help="classes to flag (default: those the model card's trust gate says are learned)")
    p.add_argument("--allow-unreliable", action="store_true",
                   help="also flag classes that are not learned; their rows carry reliable_<class>=0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                   help="DICOMweb input: QIDO-RS study filter, repeatable (e.g. StudyDate=20240101-20241231)")
    p.add_argument("--modality", default="MG", help="DICOMweb input: only this modality (default MG; '*' for any)")
    p.set_defaults(func=run_flag)

    c = subparsers.add_parser("cohort", help="export the flagged cohort from flags.csv, with a summary",
                              description="Select studies from flags.csv (conditions COLUMN OP VALUE, "
                                          "OP one of = != >= <= > < ~) and summarise per class and manufacturer.")
    c.add_argument("flags", type=Path, help="flags.csv written by `mammoflag flag`")
    c.add_argument("--where", action="append", default=[], metavar="COLUMN OP VALUE",
                   help="e.g. 'flag_biopsy_tool=1', 'max_prob_mag_view>=0.8', 'manufacturer~hologic'; repeatable "
                        "(all must hold); default: any flag")
    c.add_argument("--out", type=Path, required=True, help="cohort.csv: the selected rows of flags.csv")
    c.add_argument("--allow-unreliable", action="store_true",
                   help="select on classes whose flags are not reliable (reliable_<class>=0) too")
    c.set_defaults(func=run_cohort)


def run_flag(args: argparse.Namespace, settings) -> int:
    from flagger.checkpoint import CheckpointBusy, CheckpointMismatch, CheckpointUnwritable
    from flagger.core import FlagOptions, FlagOutputs, flag_cohort
    from flagger.labels import LabelsError, load_human_labels
    from flagger.reliability import UnreliableClass, select_classes
    from flagger.records import UnitKind
    from flagger.sources import InputError, input_kind
    from mammoflag.dicomweb import DicomWebError
    from mammoflag.registry import RegistryError, resolve_model
    from mammoflag.spec import SpecMismatch

    try:
        version = resolve_model(args.model or settings.models_dir)
        source = _input(args, settings)
        kind = input_kind(source)
        label_config = settings.label_config()
        # secrets are read only when this run needs them
        decodes_dicom = kind in (UnitKind.DICOM, UnitKind.DICOMWEB)
        secret = settings.patient_key_secret.get() if decodes_dicom and not args.distributed else None
        requested = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        selection, warnings = select_classes(version.card, requested, args.allow_unreliable)
        labels = load_human_labels(args.labels, version.spec, settings) if args.labels else None
    except (RegistryError, InputError, LabelsError, UnreliableClass, ValueError) as exc:
        print(f"mammoflag flag: {exc}", file=sys.stderr)
        return 2
    options = FlagOptions(workers=args.workers, batch_size=args.batch_size, ort_threads=args.ort_threads,
                          prefer_int8=not args.fp32,
                          display_long_side=args.display_long_side or settings.display_long_side,
                          progress=not args.no_progress)
    outputs = FlagOutputs(args.out, args.images_out, args.errors_out, args.checkpoint)
    remote = None
    if args.distributed:
        from flagger.distributed import DistributedOptions, celery_runner
        from mammoflag.jobs import create_app

        remote = celery_runner(create_app(settings), DistributedOptions(
            shard_size=args.shard_size, stall_timeout_s=args.stall_timeout, ort_threads=args.ort_threads))
    try:
        for warning in warnings:
            print(f"mammoflag flag: warning: {warning}", file=sys.stderr)
        summary = flag_cohort(source, version, outputs, label_config=label_config, human_labels=labels,
                              options=options, patient_key_secret=secret, remote=remote, selection=selection)
    except DicomWebError as exc:
        print(f"mammoflag flag: {exc} (what was flagged is in the checkpoint)", file=sys.stderr)
        return 2
    except (SpecMismatch, InputError, CheckpointMismatch, CheckpointBusy, CheckpointUnwritable, OSError) as exc:
        print(f"mammoflag flag: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _input(args: argparse.Namespace, settings):
    """The input folder, or the DICOMweb archive a dicomweb+http(s):// argument names (ValueError when wrong)."""
    from flagger.sources import DicomWebInput
    from mammoflag.dicomweb import DicomWebAuth, DicomWebQuery, DicomWebSource, RetryPolicy, is_dicomweb_url

    if not is_dicomweb_url(args.input):
        if args.query:
            raise ValueError("--query is for DICOMweb input (dicomweb+http(s)://...)")
        return Path(args.input)
    return DicomWebInput(DicomWebSource.parse(args.input), DicomWebAuth.from_settings(settings),
                         RetryPolicy.from_settings(settings), DicomWebQuery.parse(args.query, args.modality))


def run_cohort(args: argparse.Namespace, settings) -> int:
    from flagger.cohort import CohortError, Condition, UnreliableSelection, export_cohort

    try:
        summary = export_cohort(args.flags, [Condition.parse(w) for w in args.where], args.out,
                                allow_unreliable=args.allow_unreliable)
    except UnreliableSelection as exc:
        print(f"mammoflag cohort: {exc}", file=sys.stderr)
        figures = _card_explanation(settings, exc.model_version, exc.cls)
        if figures:
            print(f"mammoflag cohort: the model card says: {figures}", file=sys.stderr)
        return 2
    except CohortError as exc:
        print(f"mammoflag cohort: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _card_explanation(settings, version_name: str, cls: str) -> str | None:
    """The trust gate's words for a class, when the version is in this machine's registry."""
    from mammoflag.registry import Registry, RegistryError

    if not version_name:
        return None
    try:
        return Registry(settings.models_dir).get(version_name).card.explain(cls)
    except (RegistryError, OSError):
        return None
