"""The queue before any model: typical and diverse images first (TypiClust's idea).

With no model there is no uncertainty to order by, and the first labels decide what the first
model sees. At a few dozen labels, sampling *typical* images from *different* parts of the data
beats both random and uncertainty sampling (Hacohen, Dekel and Weinshall, "Active learning on a
budget", ICML 2022): an outlier teaches a tiny training set nothing it can generalise from, and
many images of one kind teach it one kind only.

Here the embedding is the image's appearance, as cheap as the cold start must be: the model
input's area plane (``mammoflag.preprocess``: the letterboxed display image, which the cold start
caches anyway) reduced to ``THUMB`` x ``THUMB``. Contact views and magnification views, fatty and
dense breasts, large and small, vendors' different looks fall into different clusters; a 10-pixel
marker does not show at this size, and need not: what the order buys is coverage.

:func:`typical_diverse_order` clusters the pool (k-means on the standardised, PCA-reduced
thumbnails, ``clusters`` clusters), orders each cluster's members by typicality (the inverse of
the mean distance to their nearest neighbours in the cluster) and deals the clusters round robin,
largest first: the first ``clusters`` images are one typical image per cluster (TypiClust's pick for
that budget), then every cluster's second most typical, and so on. Deterministic for a given pool.

The platform serves a pooled project's queue in this order until its first model exists
(``ml_backend.setup_project.order_cold_start``); benchmarks/bench_label_efficiency.py measures it
against a random first round and the stratified one (``ml_backend.pool.plan_cold_start``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

THUMB = 16  # thumbnail side: 256 values per image
CLUSTERS = 50  # the first round: one typical image per cluster (about what the first model trains on)
NEIGHBOURS = 20  # typicality: inverse mean distance to this many nearest neighbours (TypiClust's K)
COMPONENTS = 32  # PCA dimensions the clusters are found in


def appearance(area_plane: np.ndarray, side: int = THUMB) -> np.ndarray:
    """(side * side,) float32: a model input's area plane (uint8, square) reduced to side x side."""
    import cv2

    plane = np.ascontiguousarray(area_plane, dtype=np.uint8)
    if plane.ndim != 2 or plane.shape[0] != plane.shape[1]:
        raise ValueError(f"an area plane is square 2-D, got shape {plane.shape}")
    return cv2.resize(plane, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()


def _reduced(embeddings: np.ndarray, components: int) -> np.ndarray:
    """Standardised per dimension, then the leading principal components, each row scaled to unit length."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    k = max(1, min(components, x.shape[0] - 1, x.shape[1]))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:k].T
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)


def _typicality(z: np.ndarray, neighbours: int) -> np.ndarray:
    """(n,) inverse mean distance of each row to its ``neighbours`` nearest others (1 for a lone row)."""
    n = len(z)
    if n < 2:
        return np.ones(n)
    k = min(neighbours, n - 1)
    sq = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0.0)
    d = np.sqrt(np.partition(sq, k, axis=1)[:, 1:k + 1])  # column 0 holds each row's zero self-distance
    return 1.0 / (d.mean(axis=1) + 1e-12)


def typical_diverse_order(embeddings: np.ndarray, clusters: int = CLUSTERS, neighbours: int = NEIGHBOURS,
                          components: int = COMPONENTS, seed: int = 0) -> list[int]:
    """Every row index of ``embeddings`` (N, D), most typical of the largest cluster first (module doc)."""
    from sklearn.cluster import KMeans

    n = len(embeddings)
    if n == 0:
        return []
    z = _reduced(embeddings, components)
    k = max(1, min(clusters, len(np.unique(z.round(9), axis=0))))  # k-means finds no more clusters than points
    labels = (KMeans(n_clusters=k, n_init=3, random_state=seed).fit(z).labels_ if k > 1
              else np.zeros(n, dtype=np.int64))
    queues: list[list[int]] = []
    for c in sorted(set(labels.tolist()), key=lambda c: (-int((labels == c).sum()), c)):
        members = np.flatnonzero(labels == c)
        typ = _typicality(z[members], neighbours)
        queues.append([int(members[i]) for i in np.lexsort((members, -typ))])
    order: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        order.extend(q[depth] for q in queues if depth < len(q))
    return order


def order_scores(order: Sequence[int], n: int) -> list[float]:
    """Label Studio scores in [0, 1] for an order of ``n`` items: lower is served first (rank / n)."""
    scores = [1.0] * n
    for rank, i in enumerate(order):
        scores[i] = round(rank / max(1, n), 6)
    return scores
