"""One crash-isolating process pool: decode work runs in processes that may die, and die with us.

Decoders are native code fed by files from anywhere: a malformed file may segfault, abort on a
failed allocation, or be killed by the kernel for memory. :func:`isolated_map` runs a function
over items in ``workers`` spawned processes with a bounded number in flight; when a process dies
the pool breaks, and every item that was in flight is retried alone in a fresh process, so only
the culprit gets ``crashed(item)`` and the run goes on. It is used with one worker too: the
parent never runs a decoder itself.

Worker processes die with their parent: :func:`_worker_init` asks the kernel for SIGKILL when
the parent goes (``PR_SET_PDEATHSIG``; Linux, through ctypes) and starts a watchdog thread that
exits when the parent pid changes (other systems, or a parent thread that is not the one that
started the process), so a SIGKILLed ``import`` or ``flag`` leaves no decode process behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_INTERVAL_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)

    def watchdog() -> None:
        while True:
            threading.Event().wait(WATCHDOG_INTERVAL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def _worker_init(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    _die_with_parent(parent_pid)
    # one item per process at a time: no hidden thread pools competing with the other workers
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if initializer is not None:
        initializer(*initargs)


def new_pool(workers: int, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> ProcessPoolExecutor:
    """A spawned pool whose processes die with this one.

    spawn, not fork: the parent may hold threads (tqdm, logging handlers, an SDK client, ONNX
    Runtime's pool) that a fork would copy half-alive.
    """
    return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(), initializer, initargs))


def run_alone(fn: Callable[[T], R], item: T, crashed: Callable[[T], R],
              initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> R:
    """``fn(item)`` in a process of its own: if that one dies too, the item is the culprit."""
    with new_pool(1, initializer, initargs) as single:
        try:
            return single.submit(fn, item).result()
        except BrokenProcessPool:
            return crashed(item)


def isolated_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, crashed: Callable[[T], R],
                 window: int | None = None, ordered: bool = True,
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 on_crash: Callable[[int], None] | None = None) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` for every item, computed in ``workers`` processes.

    ``ordered``: in the items' order (else as they finish). At most ``window`` items are in
    flight (default 4 per worker), so memory stays flat however many items come. A process
    that dies breaks the pool: the items in flight that had not finished are retried one at a
    time in fresh processes (``on_crash(n)`` is told how many first), ``crashed(item)``
    standing for the result of one that kills its process again; then a fresh pool goes on.
    """
    window = window or 4 * max(1, workers)
    source = iter(items)
    pool: ProcessPoolExecutor | None = None  # started with the first item: nothing to do spawns nothing
    in_flight: deque[tuple[T, Future]] = deque()
    exhausted = False

    def fill() -> None:
        nonlocal exhausted, pool
        while not exhausted and len(in_flight) < window:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                return
            if pool is None:
                pool = new_pool(workers, initializer, initargs)
            in_flight.append((item, pool.submit(fn, item)))

    try:
        fill()
        while in_flight:
            if ordered:
                wait([in_flight[0][1]])
                ready = [in_flight[0]]
            else:
                done, _ = wait([f for _, f in in_flight], return_when=FIRST_COMPLETED)
                ready = [entry for entry in in_flight if entry[1] in done]
            broken = False
            for entry in ready:
                try:
                    result = entry[1].result()
                except BrokenProcessPool:
                    broken = True
                    break
                in_flight.remove(entry)
                yield entry[0], result
            if broken:
                lost = list(in_flight)
                in_flight.clear()
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                pool = None
                if on_crash is not None:
                    on_crash(len(lost))
                for item, future in lost:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        yield item, future.result()  # finished before the crash: keep it
                    else:
                        yield item, run_alone(fn, item, crashed, initializer, initargs)
            fill()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

