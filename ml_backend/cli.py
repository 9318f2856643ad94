"""``mammoflag setup-project`` and ``mammoflag serve-backend``: thin shells over the ML backend core."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mammoflag.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    setup = subparsers.add_parser(
        "setup-project", help="create/update a Label Studio project for active learning (idempotent)",
        description="Label config, local storage on the data root, ML backend (basic auth), webhook (secret "
                    "header), uncertainty sampling, model_version = current version, a score-ordered tab.")
    setup.add_argument("--project", required=True, metavar="ID_OR_TITLE",
                       help="project id, or a title (created when no project has it)")
    setup.add_argument("--archive", action="append", type=Path, default=[], metavar="DATA_DIR",
                       help="a labeling pool over this imported archive (repeatable): the project holds at most "
                            "MAMMOFLAG_POOL_SIZE unlabeled tasks, a stratified sample first, topped up from the "
                            "archive after every new model version")
    setup.add_argument("--overlap", type=float, default=None, metavar="FRACTION",
                       help="share of tasks read by --readers different readers (the rest once); unchanged if unset")
    setup.add_argument("--readers", type=int, default=2, metavar="N", help="readers per overlapping task (default 2)")
    setup.set_defaults(func=run_setup_project)

    serve = subparsers.add_parser("serve-backend", help="run the ML backend (Label Studio protocol) with uvicorn")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    serve.set_defaults(func=run_serve_backend)


def run_setup_project(args: argparse.Namespace, settings: Settings) -> int:
    from mammoflag.labelstudio import connect
    from ml_backend.app import celery_enqueue
    from ml_backend.review import Overlap, ensure_review
    from ml_backend.setup_project import setup_project

    overlap = Overlap(args.overlap, args.readers) if args.overlap is not None else None  # refused before any change
    result = setup_project(connect(settings), settings, args.project, settings.label_config(),
                           enqueue=celery_enqueue(settings))
    version = result.model_version or "(no model yet)"
    if result.model_version_pending:
        version += f" pending: repredict job {result.repredict_job} uploads predictions, then switches"
    print(f"project {result.project_id}: ML backend {result.ml_backend_id}, webhook {result.webhook_id}, "
          f"storages {list(result.storage_ids)}, view {result.view_id}, model_version {version}")
    from mammoflag.spec import ModelSpec

    print(ensure_review(connect(settings), result.project_id, ModelSpec.from_label_config(settings.label_config()),
                        settings.adjudicators, overlap).as_text())
    if args.archive:
        from ml_backend.setup_project import ensure_pool

        print(ensure_pool(connect(settings), settings, result.project_id, args.archive).as_text())
    else:
        from ml_backend.setup_project import order_unpooled_cold_start

        line = order_unpooled_cold_start(connect(settings), settings, result.project_id)
        if line:
            print(line)
    return 0


def run_serve_backend(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from ml_backend.app import create_app

    # One process: the model is loaded once; requests run in its thread pool (ONNX Runtime
    # releases the GIL), so /predict keeps answering while a retrain runs in a Celery worker.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower(),
                access_log=False)
    return 0
