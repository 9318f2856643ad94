"""Stopping the services mammoflag starts (Label Studio, backend, workers) and the tests' copies of them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable


def stop_process_groups(procs: Iterable[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM each process's group, wait up to ``timeout_s`` in all, then SIGKILL what is left.

    Each process must have been started with ``start_new_session=True``: its group then holds
    its own children too (Celery's pool, uvicorn's reloader, Label Studio's workers), so none
    outlives it. All groups are signalled before any is waited for, so they stop in parallel.
    """
    procs = [p for p in procs if p is not None]
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is already gone
        pass
