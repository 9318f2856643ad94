"""Agreement between readers, per class: can the labels themselves be trusted?

Every reader's answer to a task is a choice set; for one class it is a yes/no (a set without
the class, ``neither`` included, is a no). Two figures, both chance-corrected (1 is perfect,
0 is what chance gives; below ~0.6 a class's labels deserve a second look):

- **Cohen's kappa** for each pair of readers, on the tasks both answered:
  ``(p_o - p_e) / (1 - p_e)`` with ``p_e = p_a p_b + (1 - p_a)(1 - p_b)`` from each reader's own
  yes-rate; the same statistic compares a reader with the model's decisions.
- **Fleiss' kappa** over all readers, on tasks two or more readers answered, in the form that
  allows a different number of readers per task: each task's share of agreeing reader pairs is
  averaged over tasks; chance agreement comes from the pooled yes-rate (Fleiss 1971).

Each comes with a 95 % percentile interval from a bootstrap over *tasks* (the unit that was
sampled); resamples where kappa is undefined (everyone said the same) are dropped. Kappa is
None when chance explains all agreement (p_e = 1).

:class:`AgreementCounter` is the streaming form of Fleiss' kappa training writes into the
model card (one pass, no task kept); :func:`class_agreement` is the full table the report shows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000


# -- point estimates -------------------------------------------------------------------------------

def cohen_kappa(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> float | None:
    """Cohen's kappa of two raters' yes/no answers on the same items (None when undefined)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if len(x) == 0:
        return None
    k = _cohen(np.ones((1, len(x))), x, y)[0]
    return None if np.isnan(k) else float(k)


def fleiss_kappa(yes: Sequence[int] | np.ndarray, readers: Sequence[int] | np.ndarray) -> float | None:
    """Fleiss' kappa from each task's yes count and reader count (tasks with < 2 readers ignored)."""
    yes_a, m_a = np.asarray(yes, dtype=np.float64), np.asarray(readers, dtype=np.float64)
    keep = m_a >= 2
    if not keep.any():
        return None
    k = _fleiss(np.ones((1, int(keep.sum()))), yes_a[keep], m_a[keep])[0]
    return None if np.isnan(k) else float(k)


def _cohen(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kappa per row of task weights ``w`` (R, T); NaN where undefined."""
    total = w.sum(axis=1)
    po = w @ (x == y) / total
    pa, pb = w @ x / total, w @ y / total
    pe = pa * pb + (1 - pa) * (1 - pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = (po - pe) / (1 - pe)
    return np.where(pe >= 1 - 1e-12, np.nan, k)


def _fleiss(w: np.ndarray, yes: np.ndarray, m: np.ndarray) -> np.ndarray:
    no = m - yes
    pair_agreement = (yes * (yes - 1) + no * (no - 1)) / (m * (m - 1))
    observed = w @ pair_agreement / w.sum(axis=1)
    p_yes = w @ yes / (w @ m)
    chance = p_yes ** 2 + (1 - p_yes) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        k = (observed - chance) / (1 - chance)
    return np.where(chance >= 1 - 1e-12, np.nan, k)


# -- with intervals --------------------------------------------------------------------------------

@dataclass(frozen=True)
class KappaEstimate:
    kappa: float | None
    ci95: tuple[float, float] | None  # bootstrap over tasks, percentile; None when too few defined resamples
    tasks: int  # tasks the estimate is computed on
    observed: float | None  # raw agreement (share of agreeing answers / reader pairs)
    positive_rate: float | None  # pooled yes-rate of the answers counted


def _bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(stats: np.ndarray) -> tuple[float, float] | None:
    stats = stats[~np.isnan(stats)]
    if len(stats) < 20:
        return None
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def cohen_estimate(a: Sequence[bool], b: Sequence[bool], resamples: int = DEFAULT_RESAMPLES,
                   seed: int = 0) -> KappaEstimate:
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = len(x)
    if n == 0:
        return KappaEstimate(None, None, 0, None, None)
    point = cohen_kappa(x, y)
    ci = _interval(_cohen(_bootstrap_weights(n, resamples, seed), x, y)) if point is not None and resamples else None
    return KappaEstimate(point, ci, n, float(np.mean(x == y)), float((x.sum() + y.sum()) / (2 * n)))


def fleiss_estimate(yes: Sequence[int], readers: Sequence[int], resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> KappaEstimate:
    yes_a, m_a = np.asarray(yes, dtype=np.float64), np.asarray(readers, dtype=np.float64)
    keep = m_a >= 2
    yes_a, m_a = yes_a[keep], m_a[keep]
    n = len(m_a)
    if n == 0:
        return KappaEstimate(None, None, 0, None, None)
    point = fleiss_kappa(yes_a, m_a)
    no = m_a - yes_a
    observed = float(np.mean((yes_a * (yes_a - 1) + no * (no - 1)) / (m_a * (m_a - 1))))
    ci = (_interval(_fleiss(_bootstrap_weights(n, resamples, seed), yes_a, m_a))
          if point is not None and resamples else None)
    return KappaEstimate(point, ci, n, observed, float(yes_a.sum() / m_a.sum()))


# -- the per-class table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PairAgreement:
    reader_a: str
    reader_b: str
    estimate: KappaEstimate


@dataclass(frozen=True)
class ClassAgreement:
    cls: str
    double_read_tasks: int  # tasks two or more readers answered
    fleiss: KappaEstimate
    pairs: tuple[PairAgreement, ...]  # every pair of readers that shares at least one task
    reader_vs_model: Mapping[str, KappaEstimate]  # per reader, on the tasks it answered that the model scored


def class_agreement(reads: Sequence[Mapping[str, frozenset[str]]], classes: Sequence[str],
                    model: Sequence[frozenset[str] | None] | None = None, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> dict[str, ClassAgreement]:
    """Agreement per class from each task's answers by reader (``reads[i][reader] = choice set``).

    ``model[i]``: the model's decisions on task i as a choice set (None: not scored). Readers
    are named by whatever the caller uses (Label Studio user ids); pairs sort by name.
    """
    readers = sorted({r for task in reads for r in task})
    model = list(model) if model is not None else [None] * len(reads)
    out: dict[str, ClassAgreement] = {}
    for k, cls in enumerate(classes):
        multi = [task for task in reads if len(task) >= 2]
        yes = [sum(cls in s for s in task.values()) for task in multi]
        fleiss = fleiss_estimate(yes, [len(task) for task in multi], resamples, seed + 101 * k)
        pairs = []
        for i, (a, b) in enumerate(itertools.combinations(readers, 2)):
            both = [task for task in reads if a in task and b in task]
            if both:
                pairs.append(PairAgreement(a, b, cohen_estimate([cls in t[a] for t in both], [cls in t[b] for t in both],
                                                                resamples, seed + 101 * k + i + 1)))
        vs_model = {}
        for j, r in enumerate(readers):
            scored = [(task[r], m) for task, m in zip(reads, model) if r in task and m is not None]
            if scored:
                vs_model[r] = cohen_estimate([cls in s for s, _ in scored], [cls in m for _, m in scored], resamples,
                                             seed + 7919 + 101 * k + j)
        out[cls] = ClassAgreement(cls, len(multi), fleiss, tuple(pairs), vs_model)
    return out


# -- streaming, for the model card -----------------------------------------------------------------

@dataclass
class AgreementCounter:
    """Accumulates readers' answers task by task (one pass, no task kept in memory).

    ``report()`` per class: ``observed`` (share of agreeing reader pairs within a task),
    ``fleiss_kappa``, ``tasks`` and ``tasks_all_agree``, ``positive_rate``. A reader's
    contradictory or unknown answer has no yes/no: callers leave that reader out of the task.
    """

    classes: tuple[str, ...]
    tasks: int = 0
    _pair_agreement: list[float] = field(default_factory=list)
    _all_agree: list[int] = field(default_factory=list)
    _yes: list[int] = field(default_factory=list)
    _answers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.classes)
        self._pair_agreement, self._all_agree, self._yes, self._answers = [0.0] * n, [0] * n, [0] * n, [0] * n

    def add(self, reader_choices: Sequence[frozenset[str]]) -> None:
        """One task: each valid reader's choice set (a negative answer is a set without the class)."""
        m = len(reader_choices)
        if m < 2:
            return
        self.tasks += 1
        for k, c in enumerate(self.classes):
            yes = sum(1 for s in reader_choices if c in s)
            no = m - yes
            self._pair_agreement[k] += (yes * (yes - 1) + no * (no - 1)) / (m * (m - 1))
            self._all_agree[k] += int(yes == 0 or no == 0)
            self._yes[k] += yes
            self._answers[k] += m

    def report(self) -> dict[str, Any]:
        per_class: dict[str, Any] = {}
        for k, c in enumerate(self.classes):
            if not self.tasks:
                per_class[c] = {"tasks": 0, "tasks_all_agree": 0, "observed": None, "fleiss_kappa": None,
                                "positive_rate": None}
                continue
            observed = self._pair_agreement[k] / self.tasks
            p_yes = self._yes[k] / self._answers[k]
            chance = p_yes ** 2 + (1 - p_yes) ** 2
            kappa = None if chance >= 1 else (observed - chance) / (1 - chance)
            per_class[c] = {"tasks": self.tasks, "tasks_all_agree": self._all_agree[k], "observed": observed,
                            "fleiss_kappa": kappa, "positive_rate": p_yes}
        return {"double_read_tasks": self.tasks, "per_class": per_class}
