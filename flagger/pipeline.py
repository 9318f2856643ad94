"""Decode in parallel processes, classify in batches: the flagger's inner loop.

Decode processes (``workers``) load display images and build model inputs; the parent
runs ONNX Runtime on batches of them. Only a bounded number of chunks is in flight at
any moment, so memory stays flat however fast or slow either side is. With
``workers=0`` everything runs in the calling process (Celery shards, debugging).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from typing import Iterable, Iterator

import numpy as np

from flagger.records import ImageRecord, PreparedUnit, Problem, UnitResult, WorkUnit
from flagger.sources import PrepareContext, prepare_units
from mammoflag.header_evidence import evidence_matrix
from mammoflag.inference import OnnxClassifier
from mammoflag.pool import isolated_map, run_alone

log = logging.getLogger(__name__)


def prepared_units(units: Iterable[WorkUnit], ctx: PrepareContext, workers: int,
                   chunk_size: int = 8, prefetch_units: int = 96) -> Iterator[PreparedUnit]:
    """Prepare units, in ``workers`` processes when > 0; yields in completion order.

    ``prefetch_units`` is how far decoding runs ahead of the consumer. It must exceed one
    inference batch: chunks are submitted only while the consumer pulls, so with less in
    flight the decode processes sit idle through every ONNX Runtime call.

    The processes are the core's crash-isolating pool (:func:`mammoflag.pool.isolated_map`):
    a decoder that kills its process (a native library on a malformed file) loses only its
    own unit, which fails; the units in flight beside it are retried; and the processes die
    with this one.
    """
    if workers <= 0:
        for unit in units:
            yield from prepare_units([unit], ctx)
        return
    window = max(2 * workers, math.ceil(prefetch_units / chunk_size))
    for _, prepared in isolated_map(functools.partial(prepare_units, ctx=ctx), _chunked(units, chunk_size),
                                    workers=workers, crashed=functools.partial(_crashed_chunk, ctx=ctx),
                                    window=window, ordered=False,
                                    on_crash=_log_crash):
        yield from prepared


def _log_crash(in_flight: int) -> None:
    log.warning("a decode process died; retrying the units in flight (%d chunk(s)) one chunk at a time "
                "in fresh processes", in_flight)


def _crashed_chunk(chunk: list[WorkUnit], ctx: PrepareContext) -> list[PreparedUnit]:
    """A chunk whose decoding killed a fresh process too: each unit alone in a process, the culprit fails."""
    def crashed(units: list[WorkUnit]) -> list[PreparedUnit]:
        return [PreparedUnit(units[0], problem=Problem("failed", "decoding crashed its process (malformed file?)"))]

    if len(chunk) == 1:
        return crashed(chunk)
    return [prepared for unit in chunk
            for prepared in run_alone(functools.partial(prepare_units, ctx=ctx), [unit], crashed)]


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
    novelty: np.ndarray | None = None
    if images:
        header = evidence_matrix(img.header for img in images)  # zeros: an image without header evidence
        scored = [classifier.scores(np.stack([img.tensor for img in images[i : i + batch_size]]),
                                    header[i : i + batch_size])
                  for i in range(0, len(images), batch_size)]
        probs = np.concatenate([p for p, _ in scored])
        if classifier.novelty_reference is not None:
            novelty = np.concatenate([n for _, n in scored if n is not None])
    results: list[UnitResult] = []
    row = 0
    for unit in units:
        records = []
        for img in unit.images:
            records.append(ImageRecord(img.key, img.hints, tuple(float(p) for p in probs[row]),
                                       None if novelty is None else float(novelty[row])))
            row += 1
        results.append(UnitResult(unit.unit, records, unit.problem))
    return results


def _chunked(items: Iterable[WorkUnit], size: int) -> Iterator[list[WorkUnit]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
