"""Agreement between readers, per class: can the labels themselves be trusted?

Only tasks that two or more readers answered count (Label Studio's ``maximum_annotations``
sets that overlap). For each class every reader's answer is a yes/no, and the report gives:

- ``observed``: the share of reader pairs, within a task, that gave the same answer;
- ``fleiss_kappa``: that agreement corrected for chance (Fleiss 1971, in the form that allows a
  different number of readers per task: each task's pair agreement is averaged over tasks,
  chance agreement comes from the pooled yes-rate). 1 is perfect; 0 is what chance gives;
  below ~0.6 the class's labels deserve a second look before anyone trusts a model trained on them;
- ``tasks`` and ``tasks_all_agree``: how many double-read tasks, and on how many every reader agreed.

A reader's contradictory or unknown answer has no yes/no: that reader is not counted for the task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class AgreementCounter:
    """Accumulates readers' answers task by task (one pass, no task kept in memory)."""

    classes: tuple[str, ...]
    tasks: int = 0
    # per class: sum over tasks of that task's pair agreement, tasks where all agree, yes and total answers
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
