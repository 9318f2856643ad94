"""``mammoflag cohort``: select studies from flags.csv and summarise them.

Conditions are ``COLUMN OP VALUE`` with OP one of ``= != >= <= > < ~`` (``~`` = contains,
case-insensitive); several conditions must all hold. Without any, the cohort is every
study with at least one flag. Values compare as numbers when both sides are numbers.
"""

from __future__ import annotations

import csv
import operator
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mammoflag.fileio import atomic_path, safe_cell, safe_row

_OPS: dict[str, Callable[[object, object], bool]] = {
    ">=": operator.ge, "<=": operator.le, "!=": operator.ne, "=": operator.eq, ">": operator.gt, "<": operator.lt,
    "~": lambda a, b: str(b).lower() in str(a).lower(),
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|!=|=|>|<|~)\s*(.*?)\s*$")


class CohortError(ValueError):
    pass


class UnreliableSelection(CohortError):
    """A condition selects on a class whose flags the model card does not support (reliable_<class> != 1)."""

    def __init__(self, cls: str, model_version: str, why: str):
        super().__init__(f"refusing to select on {cls}: {why} (model {model_version or 'unknown'}); "
                         "pass --allow-unreliable to select on it anyway")
        self.cls, self.model_version = cls, model_version


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> "Condition":
        m = _CONDITION.match(text)
        if not m:
            raise CohortError(f"--where {text!r}: expected COLUMN OP VALUE with OP one of = != >= <= > < ~")
        return cls(*m.groups())

    def holds(self, row: dict[str, str]) -> bool:
        left, right = row[self.column], self.value
        if self.op != "~":
            try:
                return _OPS[self.op](float(left), float(right))
            except ValueError:
                pass
        return _OPS[self.op](left, right)


@dataclass
class CohortSummary:
    studies_in: int = 0
    studies_out: int = 0
    classes: tuple[str, ...] = ()
    flagged: Counter = field(default_factory=Counter)  # class -> studies in the cohort flagged for it
    by_manufacturer: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def format(self) -> str:
        lines = [f"cohort: {self.studies_out} of {self.studies_in} studies"]
        for c in self.classes:
            lines.append(f"  {c}: {self.flagged[c]} flagged")
        lines.append("by manufacturer:")
        for name in sorted(self.by_manufacturer):
            counts = self.by_manufacturer[name]
            per_class = ", ".join(f"{c} {counts[c]}" for c in self.classes)
            lines.append(f"  {name or '(unknown)'}: {counts['studies']} studies ({per_class})")
        return "\n".join(lines)


def classes_of(columns: Sequence[str]) -> tuple[str, ...]:
    """The classes of a flags.csv: its flag_<cls> columns, in order."""
    return tuple(c[len("flag_"):] for c in columns if c.startswith("flag_") and not c.startswith("flagged_by_"))


def classes_in(condition: Condition, classes: Sequence[str]) -> list[str]:
    """The classes a condition selects on: its column is ``<anything>_<class>`` (flag_, max_prob_, source_ ...)."""
    return [c for c in classes if condition.column.endswith(f"_{c}") and condition.column != f"reliable_{c}"]


def _check_reliable(row: dict[str, str], classes: Sequence[str]) -> None:
    for c in classes:
        value = row.get(f"reliable_{c}")
        if value == "1":
            continue
        why = (f"flags.csv has no reliable_{c} column (written before the trust gate: flag the cohort again)"
               if value is None else f"reliable_{c}={value}: the model has not learned it")
        raise UnreliableSelection(c, row.get("model_version", ""), why)


def export_cohort(flags_csv: Path, conditions: Sequence[Condition], out: Path,
                  allow_unreliable: bool = False) -> CohortSummary:
    """Stream flags.csv, keep the rows meeting every condition (default: any reliable flag), write them to ``out``.

    A condition on a class whose rows say ``reliable_<class>=0`` raises :class:`UnreliableSelection`
    (nothing is written) unless ``allow_unreliable``; the default selection uses reliable classes only.
    """
    with open(flags_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        classes = classes_of(columns)
        if not classes or "study_id" not in columns:
            raise CohortError(f"{Path(flags_csv).name}: not a flags.csv (no study_id / flag_<class> columns)")
        for cond in conditions:
            if cond.column not in columns:
                raise CohortError(f"--where {cond.column}: no such column (have: {', '.join(columns)})")
        summary = CohortSummary(classes=classes)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as g:
            writer = csv.writer(g)
            writer.writerow(safe_row(columns))  # a flags.csv from elsewhere may carry anything: every cell safe
            selected = sorted({c for cond in conditions for c in classes_in(cond, classes)})
            for row in reader:
                summary.studies_in += 1
                if not allow_unreliable:
                    _check_reliable(row, selected)
                if conditions:
                    keep = all(c.holds(row) for c in conditions)
                else:
                    keep = any(row[f"flag_{c}"] == "1" and (allow_unreliable or row.get(f"reliable_{c}") == "1")
                               for c in classes)
                if not keep:
                    continue
                writer.writerow([safe_cell(row.get(c, "")) for c in columns])
                summary.studies_out += 1
                by_maker = summary.by_manufacturer[row.get("manufacturer", "")]
                by_maker["studies"] += 1
                for c in classes:
                    flagged = row[f"flag_{c}"] == "1"
                    summary.flagged[c] += flagged
                    by_maker[c] += flagged
    return summary
