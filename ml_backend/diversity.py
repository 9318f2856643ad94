"""Diversity for several annotators at once: one member of a group of near-duplicates at a time.

Label Studio's uncertainty sampling serves the task with the lowest prediction score (with more
than one annotator, a random one of the lowest ``annotators + 1``). Ranked by raw confidence,
those few are often the four views of one hard study, or the same image imported twice, so
annotators working at once would label near-duplicates.

We group tasks that are near-duplicates of each other (same study, or the same 8x8 average-hash
of the display image: identical or near-identical pixels). Within a group, members are ranked by
confidence (rank 0 = least certain). The score sent to Label Studio is

    (rank + confidence) / (R + 1)        R = the largest rank in this run

so the queue serves one task per group, least certain first, then every group's second member,
and so on: the studies interleave. Label Studio drops predictions whose score is outside [0, 1]
(checked on 1.23.2: the bulk import silently creates fewer), hence the division; the order is
what matters, and a representative's score is its confidence scaled by 1 / (R + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

HASH_SIDE = 8


def average_hash(display: np.ndarray, side: int = HASH_SIDE) -> bytes:
    """A perceptual hash: the side x side box-reduced image thresholded at its mean, as bytes."""
    small = np.asarray(Image.fromarray(display).resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    return np.packbits(small > small.mean()).tobytes()


@dataclass(frozen=True)
class RankedItem:
    confidence: float  # 1 - max binary entropy: lower = less certain
    study: str | None  # Study Instance UID (or its hash); None when unknown
    image_hash: bytes | None  # average_hash of the display image; None when unknown


def group_ids(items: Sequence[RankedItem]) -> list[int]:
    """Connected groups: items sharing a study or an image hash are in one group (union-find)."""
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[tuple[str, object], int] = {}
    for i, item in enumerate(items):
        for key in (("study", item.study), ("hash", item.image_hash)):
            if key[1] is None or key[1] == "":
                continue
            if key in first_of:
                parent[root(i)] = root(first_of[key])
            else:
                first_of[key] = i
    return [root(i) for i in range(len(items))]


def diversified_scores(items: Sequence[RankedItem]) -> list[float]:
    """Each item's score for Label Studio, in [0, 1]: (rank in its group + confidence) / (R + 1)."""
    groups = group_ids(items)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    ranks = [0] * len(items)
    for indices in members.values():
        # ties broken by position so the result is deterministic
        for rank, i in enumerate(sorted(indices, key=lambda j: (items[j].confidence, j))):
            ranks[i] = rank
    levels = max(ranks, default=0) + 1
    return [round((rank + min(max(item.confidence, 0.0), 1.0)) / levels, 6) for rank, item in zip(ranks, items)]
