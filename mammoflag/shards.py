"""The shard file protocol shared by distributed import and distributed flagging.

A coordinator writes each shard's units to ``<job dir>/shards/<n>.jsonl`` on storage every
worker sees and sends a Celery task naming it; the worker touches ``heartbeats/<n>`` while it
works and writes ``results/<n>.jsonl`` atomically when done. The coordinator merges results in
shard order and sends a shard again when its task failed or its heartbeat went stale.
"""

from __future__ import annotations

import time
from pathlib import Path


class ShardPaths:
    """The three files of one shard; mixed into a frozen job dataclass with ``job_dir`` and ``shard``."""

    job_dir: str
    shard: int

    @property
    def units_path(self) -> Path:
        return Path(self.job_dir) / "shards" / f"{self.shard:06d}.jsonl"

    @property
    def result_path(self) -> Path:
        return Path(self.job_dir) / "results" / f"{self.shard:06d}.jsonl"

    @property
    def heartbeat_path(self) -> Path:
        return Path(self.job_dir) / "heartbeats" / f"{self.shard:06d}"


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def why_resend(app, task_id: str, heartbeat: Path, sent_at: float, now: float, last_activity: float,
               stall_timeout_s: float) -> str:
    """Why a shard must be sent again ("" when it must not): its task failed, or it stalled."""
    result = app.AsyncResult(task_id)
    if result.state == "FAILURE":
        # The worker's own error (a missing secret, an unreadable model), never a file's content:
        # per-file problems are results, not task failures.
        return f"its task failed: {type(result.result).__name__}: {str(result.result)[:300]}"
    beat = mtime(heartbeat)
    # A started shard's wall clock vs. the heartbeat file's mtime: both are this host's view
    # of shared storage; compare the heartbeat's age by wall clock.
    if beat is not None:
        age = time.time() - beat
        if age > stall_timeout_s and now - sent_at > stall_timeout_s:
            return f"no heartbeat for {age:.0f}s"
        return ""
    # Not started: normal while workers are busy; suspicious only when nothing anywhere moved.
    if now - last_activity > stall_timeout_s and now - sent_at > stall_timeout_s:
        return f"not started and no progress anywhere for {now - last_activity:.0f}s"
    return ""
