"""The job/queue layer: the one Celery app factory, every task name and queue, the retrain run lock.

Stages define their tasks (``@shared_task(name=TaskName.X)``) and send each other's by name
through :func:`create_app`; none imports another stage for it. The worker entry point
(:mod:`mammoflag.worker`, composition) is the only place that lists the stages' task modules.
Building an app does no I/O.
"""

from __future__ import annotations

import fcntl
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Protocol, Sequence

from celery import Celery
from kombu import Queue

from mammoflag.fileio import atomic_write
from mammoflag.settings import Settings


class Queues(StrEnum):
    TRAINING = "training"
    PREDICT = "predict"
    FLAGGING = "flagging"


class TaskName(StrEnum):
    """Every Celery task of mammoflag, by the name it is sent with."""

    RETRAIN = "mammoflag.retrain"  # (project_id: int, force: bool = False) -> dict; training/tasks.py
    REPREDICT = "mammoflag.repredict"  # (project_id: int, version: str) -> dict; ml_backend/tasks.py
    FLAG_SHARD = "mammoflag.flag_shard"  # (job: dict) -> dict; flagger/tasks.py
    IMPORT_SHARD = "mammoflag.import_shard"  # (job: dict) -> dict; importers/tasks.py
    FILL_POOL = "mammoflag.fill_pool"  # (project_id: int) -> dict; ml_backend/tasks.py (the pool's cold start)


TASK_QUEUES = {TaskName.RETRAIN: Queues.TRAINING, TaskName.REPREDICT: Queues.PREDICT,
               TaskName.FLAG_SHARD: Queues.FLAGGING, TaskName.IMPORT_SHARD: Queues.FLAGGING,
               TaskName.FILL_POOL: Queues.PREDICT}

LOCK_MARGIN_S = 120  # the Redis lock outlives the task's hard time limit by this much
# A "retrain queued" mark expires after this: a message lost with a flushed broker blocks
# webhook-started retrains for at most this long (a late duplicate is harmless: the lock coalesces).
QUEUED_MARK_TTL_S = 900


def create_app(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The Celery app for these settings; ``include`` names the task modules a worker imports."""
    app = Celery("mammoflag", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,  # a worker killed mid-task leaves the message for another worker
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # long tasks: never hoard messages a sibling could run
        task_track_started=True,
        task_default_queue=Queues.TRAINING.value,
        task_routes={name.value: {"queue": queue.value} for name, queue in TASK_QUEUES.items()},
        broker_connection_retry_on_startup=True,
        result_expires=7 * 24 * 3600,
    )
    if settings.broker_url.startswith("redis"):
        # acks_late + Redis: a message not acked within this window is delivered again; keep it
        # above the longest task so a slow (not dead) retrain is never run twice at once.
        app.conf.broker_transport_options = {"visibility_timeout": settings.retrain_time_limit_s + 600}
    # a worker started without -Q consumes every queue; -Q picks some (e.g. flagging-only machines)
    app.conf.task_queues = [Queue(q.value) for q in Queues]
    app.conf.include = list(include)
    app.mammoflag_settings = settings
    return app


def settings_of(app: Celery) -> Settings:
    """The settings the app was built with (tasks read them from ``self.app``)."""
    settings: Settings = app.mammoflag_settings
    return settings


# -- the per-project run lock --------------------------------------------------------------------

class RunLock(Protocol):
    def acquire(self, holder: str) -> bool: ...
    def release(self, holder: str) -> None: ...
    def want_rerun(self, force: bool) -> None: ...
    def take_rerun(self) -> str | None: ...  # None, "normal" or "force"
    def mark_queued(self) -> bool: ...  # True: no retrain was waiting, send one
    def clear_queued(self) -> None: ...


class RedisRunLock:
    """SET NX EX lock in the Redis broker's database, plus a 'rerun wanted' key.

    The lock's value is the Celery task id. A message delivered again after its worker died
    carries the same id, so it may take over its own lock (the broker's visibility timeout is
    longer than the task time limit, so the first delivery is surely dead by then).
    """

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, redis_url: str, project_id: int, ttl_s: int, kind: str = "retrain"):
        import redis

        self.redis = redis.Redis.from_url(redis_url)
        self.key = f"mammoflag:{kind}:{project_id}:lock"
        self.rerun_key = f"mammoflag:{kind}:{project_id}:rerun"
        self.queued_key = f"mammoflag:{kind}:{project_id}:queued"
        self.ttl_s = ttl_s

    def acquire(self, holder: str) -> bool:
        if self.redis.set(self.key, holder, nx=True, ex=self.ttl_s):
            return True
        if _text(self.redis.get(self.key)) == holder:
            self.redis.expire(self.key, self.ttl_s)
            return True
        return False

    def release(self, holder: str) -> None:
        self.redis.eval(self._RELEASE, 1, self.key, holder)

    def want_rerun(self, force: bool) -> None:
        if force:
            self.redis.set(self.rerun_key, "force", ex=self.ttl_s)
        else:
            self.redis.set(self.rerun_key, "normal", nx=True, ex=self.ttl_s)

    def take_rerun(self) -> str | None:
        return _text(self.redis.getdel(self.rerun_key)) or None

    def mark_queued(self) -> bool:
        return bool(self.redis.set(self.queued_key, "1", nx=True, ex=QUEUED_MARK_TTL_S))

    def clear_queued(self) -> None:
        self.redis.delete(self.queued_key)


class FileRunLock:
    """flock on ``<home>/locks/retrain-<project>.lock`` for the embedded broker (one machine).

    The kernel drops an flock when its process dies, so a killed worker never leaves it held.
    """

    def __init__(self, home: Path, project_id: int, kind: str = "retrain"):
        self.dir = Path(home) / "locks"
        self.path = self.dir / f"{kind}-{project_id}.lock"
        self.rerun_path = self.dir / f"{kind}-{project_id}.rerun"
        self.queued_path = self.dir / f"{kind}-{project_id}.queued"
        self._fd: int | None = None

    def acquire(self, holder: str) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self, holder: str) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def want_rerun(self, force: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if force or not self.rerun_path.exists():
            atomic_write(self.rerun_path, "force" if force else "normal")

    def take_rerun(self) -> str | None:
        try:
            value = self.rerun_path.read_text().strip()
        except FileNotFoundError:
            return None
        self.rerun_path.unlink(missing_ok=True)
        return value or None

    def mark_queued(self) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.queued_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return True
        except FileExistsError:
            try:
                stale = time.time() - self.queued_path.stat().st_mtime > QUEUED_MARK_TTL_S
            except FileNotFoundError:  # cleared meanwhile: a run started, this change may be unseen
                return self.mark_queued()
            if stale:
                os.utime(self.queued_path)
            return stale

    def clear_queued(self) -> None:
        self.queued_path.unlink(missing_ok=True)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def run_lock_for(settings: Settings, project_id: int, kind: str = "retrain") -> RunLock:
    """The project's run lock for ``kind`` ("retrain"; "pool": one re-prediction / top-up at a time)."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisRunLock(settings.broker_url, project_id, settings.retrain_time_limit_s + LOCK_MARGIN_S, kind)
    return FileRunLock(settings.home, project_id, kind)
