"""Decode in parallel processes, classify in batches: the flagger's inner loop.

Decode processes (``workers``) load display images and build model inputs; the parent
runs ONNX Runtime on batches of them. Only a bounded number of chunks is in flight at
any moment, so memory stays flat however fast or slow either side is. With
``workers=0`` everything runs in the calling process (Celery shards, debugging).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

import numpy as np

from flagger.records import ImageRecord, PreparedUnit, Problem, UnitResult, WorkUnit
from flagger.sources import PrepareContext, prepare_units
from mammoflag.inference import OnnxClassifier

log = logging.getLogger(__name__)


def prepared_units(units: Iterable[WorkUnit], ctx: PrepareContext, workers: int,
                   chunk_size: int = 8, prefetch_units: int = 96) -> Iterator[PreparedUnit]:
    """Prepare units, in ``workers`` processes when > 0; yields in completion order.

    ``prefetch_units`` is how far decoding runs ahead of the consumer. It must exceed one
    inference batch: chunks are submitted only while the consumer pulls, so with less in
    flight the decode processes sit idle through every ONNX Runtime call.
    """
    if workers <= 0:
        for unit in units:
            yield from prepare_units([unit], ctx)
        return
    # spawn, not fork: the parent holds ONNX Runtime's thread pool, which a fork would copy half-alive
    mp = multiprocessing.get_context("spawn")
    window = max(2 * workers, math.ceil(prefetch_units / chunk_size))
    chunks = _chunked(units, chunk_size)
    pool = _new_pool(workers, mp)
    in_flight: dict[Future, list[WorkUnit]] = {}
    try:
        for chunk in itertools.islice(chunks, window):
            in_flight[pool.submit(prepare_units, chunk, ctx)] = chunk
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                chunk = in_flight.pop(future)
                try:
                    prepared = future.result()
                except BrokenProcessPool:
                    # A decoder crashed its process (a native library on a malformed file). Every chunk
                    # in flight is lost with it: retry each of their units alone, then carry on.
                    lost = [chunk, *in_flight.values()]
                    in_flight.clear()
                    log.warning("a decode process died; retrying the %d units in flight one by one "
                                "in fresh processes", sum(len(c) for c in lost))
                    pool.shutdown(wait=False, cancel_futures=True)
                    for unit in (u for c in lost for u in c):
                        yield _prepare_isolated(unit, ctx, mp)
                    pool = _new_pool(workers, mp)
                    break
                nxt = next(chunks, None)
                if nxt is not None:
                    in_flight[pool.submit(prepare_units, nxt, ctx)] = nxt
                yield from prepared
            if not in_flight:
                for chunk in itertools.islice(chunks, window):
                    in_flight[pool.submit(prepare_units, chunk, ctx)] = chunk
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _new_pool(workers: int, mp) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=mp, initializer=_decode_process_init)


def _prepare_isolated(unit: WorkUnit, ctx: PrepareContext, mp) -> PreparedUnit:
    """One unit in a process of its own: if it crashes that process too, it is the culprit."""
    with ProcessPoolExecutor(1, mp_context=mp, initializer=_decode_process_init) as pool:
        try:
            return pool.submit(prepare_units, [unit], ctx).result()[0]
        except BrokenProcessPool:
            return PreparedUnit(unit, problem=Problem("failed", "decoding crashed its process (malformed file?)"))


def classified_batches(prepared: Iterable[PreparedUnit], classifier: OnnxClassifier,
                       batch_size: int) -> Iterator[list[UnitResult]]:
    """Group prepared units into batches of about ``batch_size`` images and classify each batch.

    A unit (all frames of a DICOM file) never straddles two batches: each yielded list holds
    whole units, which is what the checkpoint commits together.
    """
    pending: list[PreparedUnit] = []
    n_images = 0
    for unit in prepared:
        pending.append(unit)
        n_images += len(unit.images)
        if n_images >= batch_size:
            yield _classify(pending, classifier, batch_size)
            pending, n_images = [], 0
    if pending:
        yield _classify(pending, classifier, batch_size)


def _classify(units: list[PreparedUnit], classifier: OnnxClassifier, batch_size: int) -> list[UnitResult]:
    images = [img for u in units for img in u.images]
    probs = np.zeros((0, len(classifier.spec.classes)))
    if images:
        probs = np.concatenate([
            classifier.probabilities(np.stack([img.tensor for img in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ])
    results: list[UnitResult] = []
    row = 0
    for unit in units:
        records = []
        for img in unit.images:
            records.append(ImageRecord(img.key, img.hints, tuple(float(p) for p in probs[row])))
            row += 1
        results.append(UnitResult(unit.unit, records, unit.problem))
    return results


def _chunked(items: Iterable[WorkUnit], size: int) -> Iterator[list[WorkUnit]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _decode_process_init() -> None:
    # A decode process is one core's worth of work: no hidden thread pools competing with ORT.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
