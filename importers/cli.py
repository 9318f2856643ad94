"""``mammoflag import`` and ``mammoflag synth``: thin shells around importers.run and importers.synthetic."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mammoflag.dicom.types import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_FRAME_MB
from mammoflag.settings import Settings

EXIT_CANNOT_RUN = 2  # the import could not run at all (bad arguments, missing folder, no Label Studio ...)


def register(subparsers) -> None:
    imp = subparsers.add_parser(
        "import", help="normalize a folder of DICOM files into display PNGs, tasks.json and a report",
        description="Walk DICOM_DIR recursively, write display PNGs, manifest.csv, tasks.json and "
                    "import_report.csv (one row per input file) under DATA_DIR; with --project also import the "
                    "tasks into that Label Studio project (a project with a labeling pool, see setup-project "
                    "--archive, gets the DATA_DIR as one more archive instead, and its pool chooses). Re-running into the same DATA_DIR resumes. Exit "
                    "status 0 when the run completed, whatever was skipped.")
    imp.add_argument("dicom_dir", metavar="DICOM_DIR",
                     help="a folder of DICOM files, or a DICOMweb service: dicomweb+http(s)://HOST/PATH (QIDO-RS "
                          "lists, WADO-RS retrieves; credentials from MAMMOFLAG_DICOMWEB_USER / _PASSWORD or _TOKEN)")
    imp.add_argument("--out", type=Path, required=True, metavar="DATA_DIR",
                     help="output folder; must be inside MAMMOFLAG_DATA_ROOT with --project")
    imp.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="worker processes normalizing files (default: the number of CPU cores)")
    imp.add_argument("--project", metavar="ID_OR_TITLE",
                     help="Label Studio project (id or title; created when no project has that title)")
    imp.add_argument("--long-side", type=int, default=None,
                     help="display PNG long side in pixels (default: MAMMOFLAG_DISPLAY_LONG_SIDE or 1024)")
    imp.add_argument("--window-index", type=int, default=0,
                     help="which VOI window / VOI LUT to apply when a file has several (default 0: the first)")
    imp.add_argument("--max-frame-mb", type=int, default=DEFAULT_MAX_FRAME_MB,
                     help="refuse, before decoding, a frame whose Rows x Columns x bytes per sample exceeds this "
                          f"(default {DEFAULT_MAX_FRAME_MB}: ~4.5x the largest mammography detector)")
    imp.add_argument("--max-file-mb", type=int, default=DEFAULT_MAX_FILE_MB,
                     help=f"the same for all frames of a file together (default {DEFAULT_MAX_FILE_MB})")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.add_argument("--distributed", action="store_true",
                     help="normalize in shards on Celery workers (queue 'flagging', storage shared with this machine); "
                          "the DATA_DIR is the same as a local run's")
    imp.add_argument("--shard-size", type=int, default=200, help="files per shard with --distributed (default 200)")
    imp.add_argument("--stall-timeout", type=float, default=300.0,
                     help="with --distributed: seconds without a heartbeat before a shard is sent again (default 300)")
    remote = imp.add_argument_group("DICOMweb sources (dicomweb+http(s)://...)")
    remote.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                        help="QIDO-RS study filter, repeatable (e.g. StudyDate=20240101-20241231)")
    remote.add_argument("--modality", default="MG",
                        help="only instances of this modality (default MG; '*' for every modality)")
    remote.add_argument("--concurrency", type=int, default=4, help="WADO-RS retrievals in flight (default 4)")
    remote.add_argument("--keep-dicom", type=Path, default=None, metavar="DIR",
                        help="keep each retrieved instance as DIR/<study>/<series>/<sop>.dcm (default: removed once "
                             "imported; only the display images stay)")
    imp.set_defaults(func=run_import)

    synth = subparsers.add_parser(
        "synth", help="write synthetic mammography DICOMs with known labels (demo and tests)",
        description="Write N synthetic studies (several vendors' header conventions, with and without biopsy "
                    "tools and magnification views) and OUT_DIR/ground_truth.csv.")
    synth.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    synth.add_argument("--studies", type=int, required=True, metavar="N")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=None,
                       help="long side of every image in pixels (default: each vendor's realistic detector size)")
    synth.add_argument("--family", default="classic", metavar="NAME",
                       help="distributions drawn: classic (default; the original, easy), standard or shifted (two "
                            "different hard families: small, faint and cut markers, distractors, more vendors)")
    synth.set_defaults(func=run_synth)


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    from importers.run import ImportRunError, import_dicoms
    from importers.to_label_studio import OutsideDataRoot, check_inside_data_root
    from mammoflag.dicom.types import NormalizeOptions

    secret = settings.patient_key_secret.get()  # MissingSecret -> exit 2 before any work
    if args.workers < 1 or (args.long_side is not None and args.long_side < 16) or args.window_index < 0 \
            or args.max_frame_mb < 1 or args.max_file_mb < args.max_frame_mb:
        print("mammoflag import: --workers must be >= 1, --long-side >= 16, --window-index >= 0, --max-frame-mb >= 1 "
              "and --max-file-mb >= --max-frame-mb", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.project is not None:
        settings.label_studio_token.get()  # fail now, not after hours of importing
        try:
            check_inside_data_root(args.out, settings.data_root)
        except OutsideDataRoot as exc:
            print(f"mammoflag import: {exc}", file=sys.stderr)
            return EXIT_CANNOT_RUN
    options = NormalizeOptions(long_side=args.long_side or settings.display_long_side,
                               window_index=args.window_index, max_frame_mb=args.max_frame_mb,
                               max_file_mb=args.max_file_mb)
    try:
        source = _source(args, settings)
    except ValueError as exc:
        print(f"mammoflag import: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        runner = None
        if args.distributed:
            from importers.distributed import celery_job_runner
            from mammoflag.jobs import create_app

            from importers.distributed import DistributedImportOptions

            runner = celery_job_runner(create_app(settings), Path(args.out).resolve(),
                                       DistributedImportOptions(shard_size=max(1, args.shard_size),
                                                                stall_timeout_s=args.stall_timeout))
        summary = import_dicoms(source, args.out, options, secret, data_root=settings.data_root,
                                workers=args.workers, progress=not args.no_progress, job_runner=runner)
    except ImportRunError as exc:
        print(f"mammoflag import: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(summary.as_text())
    if args.project is None:
        return 0
    return _to_label_studio(args, settings)


def _source(args: argparse.Namespace, settings: Settings):
    """The folder, or the DICOMweb import a ``dicomweb+http(s)://`` argument names (ValueError when it is wrong)."""
    from mammoflag.dicomweb import DicomWebQuery, DicomWebSource, client_from_settings, is_dicomweb_url

    if not is_dicomweb_url(args.dicom_dir):
        if args.query or args.keep_dicom:
            raise ValueError("--query and --keep-dicom are for DICOMweb sources (dicomweb+http(s)://...)")
        return Path(args.dicom_dir)
    from importers.dicomweb_source import DicomWebImport

    if args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    source = DicomWebSource.parse(args.dicom_dir)  # DicomWebUrlError is a ValueError
    query = DicomWebQuery.parse(args.query, args.modality)
    client = client_from_settings(source, settings, pool_size=args.concurrency + 2)  # MissingSecret -> exit 2
    return DicomWebImport(source, client, query, args.concurrency,
                          args.keep_dicom.resolve() if args.keep_dicom else None)


def _to_label_studio(args: argparse.Namespace, settings: Settings) -> int:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from importers.to_label_studio import import_tasks_to_label_studio
    from mammoflag.labelstudio import LabelStudioError, connect

    try:
        client = connect(settings)
        result = import_tasks_to_label_studio(client, args.project, args.out, settings.data_root,
                                              settings.label_config().xml)
    except (ApiError, LabelStudioError, httpx.HTTPError) as exc:
        detail = str(exc)
        if isinstance(exc, ApiError):
            body = exc.body if isinstance(exc.body, dict) else {}
            detail = f"HTTP {exc.status_code}: {body.get('validation_errors') or body.get('detail') or ''}"[:500]
        print(f"mammoflag import: the images are imported, but the tasks could not be sent to Label Studio at "
              f"{settings.label_studio_url} ({detail}); run the same command again to retry", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(result.as_text())
    if result.pooled:  # the pool (ml_backend) chooses the tasks: its fill is sent by name, never imported
        from mammoflag.jobs import Queues, TaskName, create_app

        job = create_app(settings).send_task(TaskName.FILL_POOL.value, args=[result.project_id],
                                             queue=Queues.PREDICT.value)
        print(f"pool fill job {job.id} sent (queue {Queues.PREDICT.value}): a worker fills free pool slots with a "
              f"stratified sample of every archive of the pool")
    return 0


def run_synth(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from importers.synthetic import FAMILIES, read_ground_truth, write_synthetic_cohort

    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # its encoder logs every tile at INFO
    if args.studies < 1 or (args.size is not None and args.size < 32):
        print("mammoflag synth: --studies must be >= 1 and --size >= 32", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.family not in FAMILIES:
        print(f"mammoflag synth: --family must be one of {', '.join(sorted(FAMILIES))}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    gt = write_synthetic_cohort(args.out_dir, args.studies, seed=args.seed, size=args.size, family=args.family)
    rows = read_ground_truth(gt)
    biopsy = sum(r["biopsy_tool"] == "1" for r in rows)
    mag = sum(r["mag_view"] == "1" for r in rows)
    print(f"{args.family}: {args.studies} studies, {len(rows)} frames ({biopsy} with a biopsy tool, {mag} "
          f"magnification views) under {args.out_dir}; labels in {gt}")
    return 0
