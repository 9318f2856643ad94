"""The Celery worker entry point (composition): ``celery -A mammoflag.worker worker``.

The only place that names every stage's task module. Settings are read once, as the CLI reads
them: the environment first, then ``$MAMMOFLAG_HOME/secrets.env`` for what it leaves unset. The
app is built when Celery asks for ``app`` (``celery -A`` reads the attribute), not at import.
"""

from __future__ import annotations

import os

from celery import Celery

from mammoflag.jobs import create_app
from mammoflag.settings import Settings, environment_with_secrets

TASK_MODULES = ("training.tasks", "ml_backend.tasks", "flagger.tasks", "importers.tasks")


def create_worker_app(settings: Settings) -> Celery:
    """The app a worker runs: every stage's tasks registered."""
    return create_app(settings, include=TASK_MODULES)


def register(subparsers) -> None:
    worker = subparsers.add_parser("worker", help="start a Celery worker for retraining, re-prediction and flagging")
    worker.add_argument("--queues", "-Q", help="comma-separated queues (default: all)")
    worker.add_argument("--concurrency", "-c", type=int, default=1)
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=run_worker)


def run_worker(args, settings: Settings) -> int:
    argv = ["worker", f"--loglevel={args.loglevel}", f"--concurrency={args.concurrency}"]
    if args.queues:
        argv.append(f"--queues={args.queues}")
    create_worker_app(settings).worker_main(argv)
    return 0


def __getattr__(name: str) -> Celery:
    if name in ("app", "celery"):
        return create_worker_app(Settings.from_env(environment_with_secrets(os.environ)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
