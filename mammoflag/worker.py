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

TASK_MODULES = ("training.tasks", "ml_backend.tasks", "flagger.tasks")


def create_worker_app(settings: Settings) -> Celery:
    """The app a worker runs: every stage's tasks registered."""
    return create_app(settings, include=TASK_MODULES)


def __getattr__(name: str) -> Celery:
    if name in ("app", "celery"):
        return create_worker_app(Settings.from_env(environment_with_secrets(os.environ)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
