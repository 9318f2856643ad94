"""The one Celery app of mammoflag: retraining, re-prediction and cohort-flagging shards.

``celery -A training.celery_app worker`` starts a worker. The app is configured from
:class:`mammoflag.settings.Settings` (Redis when ``MAMMOFLAG_BROKER_URL`` names it, else
an embedded SQLAlchemy broker on SQLite under ``MAMMOFLAG_HOME``). Building it does no I/O.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from mammoflag.settings import Settings

TASK_MODULES = ["training.tasks", "ml_backend.tasks", "flagger.tasks"]
QUEUES = ("training", "predict", "flagging")


def create_app(settings: Settings) -> Celery:
    app = Celery("mammoflag", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,  # a worker killed mid-task leaves the message for another worker
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # long tasks: never hoard messages a sibling could run
        task_track_started=True,
        task_default_queue="training",
        task_routes={
            "mammoflag.retrain": {"queue": "training"},
            "mammoflag.repredict": {"queue": "predict"},
            "mammoflag.flag_shard": {"queue": "flagging"},
        },
        broker_connection_retry_on_startup=True,
        result_expires=7 * 24 * 3600,
    )
    if settings.broker_url.startswith("redis"):
        # acks_late + Redis: a message not acked within this window is delivered again; keep it
        # above the longest task so a slow (not dead) retrain is never run twice at once.
        app.conf.broker_transport_options = {"visibility_timeout": settings.retrain_time_limit_s + 600}
    # a worker started without -Q consumes every queue; -Q picks some (e.g. flagging-only machines)
    app.conf.task_queues = [Queue(name) for name in QUEUES]
    app.conf.include = [m for m in TASK_MODULES if _module_exists(m)]
    app.mammoflag_settings = settings  # type: ignore[attr-defined]
    return app


def _module_exists(name: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def settings_of(app: Celery) -> Settings:
    return app.mammoflag_settings  # type: ignore[attr-defined]


# The `celery -A training.celery_app` entry point: settings read once, from the environment.
app = create_app(Settings.from_env())
