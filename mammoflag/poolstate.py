"""The labeling pool's state file: which projects have a pool, over which archives (a contract between stages).

A project has a labeling pool (ml_backend/pool.py decides what it holds) exactly when
``<data root>/.pools/project-<id>.json`` exists: ``setup-project --archive`` writes it, the
pool's rounds (``mammoflag.repredict``) move its cursor, and ``mammoflag import --project``
reads it to learn that the project wants its archive indexed, not every image sent to Label
Studio (it registers the new DATA_DIR as one more archive and leaves the choice to the pool's
fill, ``mammoflag.fill_pool``). One JSON file per project on the storage every worker shares,
written atomically; no stage keeps it anywhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from mammoflag.datadir import MANIFEST_FILE
from mammoflag.fileio import atomic_write_json

POOL_STATE_DIR = ".pools"


@dataclass(frozen=True)
class Cursor:
    archive: int = 0  # index into PoolState.archives
    offset: int = 0  # byte offset of the next manifest row (0: just after the header)
    laps: int = 0  # full passes over the archive completed

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PoolState:
    """Per project: the archive DATA_DIRs (relative to the data root), the window cursor, the last version topped up."""

    project_id: int
    archives: tuple[str, ...] = ()
    cursor: Cursor = field(default_factory=Cursor)
    topped_up_version: str | None = None
    scored_total: int = 0  # archive images scored by all rounds so far

    def to_json(self) -> dict:
        return {"project_id": self.project_id, "archives": list(self.archives), "cursor": self.cursor.to_json(),
                "topped_up_version": self.topped_up_version, "scored_total": self.scored_total}

    @classmethod
    def from_json(cls, d: Mapping) -> "PoolState":
        return cls(int(d["project_id"]), tuple(d.get("archives") or ()), Cursor(**(d.get("cursor") or {})),
                   d.get("topped_up_version"), int(d.get("scored_total") or 0))


def state_path(data_root: Path, project_id: int) -> Path:
    return Path(data_root) / POOL_STATE_DIR / f"project-{int(project_id)}.json"


def load_state(data_root: Path, project_id: int) -> PoolState | None:
    """The project's pool state; None when the project has no pool (every task imported: the old way)."""
    path = state_path(data_root, project_id)
    try:
        return PoolState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def save_state(data_root: Path, state: PoolState) -> None:
    path = state_path(data_root, state.project_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, state.to_json())


def register_archives(data_root: Path, project_id: int, archives: Sequence[Path]) -> PoolState:
    """Give the project a pool over these archive DATA_DIRs (idempotent; new ones are appended)."""
    root = Path(data_root).resolve()
    rel = []
    for a in archives:
        a = Path(a).resolve()
        if not a.is_relative_to(root) or a == root:
            raise ValueError(f"archive {a} is not a folder below the data root {root}")
        if not (a / MANIFEST_FILE).exists():
            raise FileNotFoundError(f"{a / MANIFEST_FILE} does not exist: run `mammoflag import` into it first")
        rel.append(a.relative_to(root).as_posix())
    state = load_state(data_root, project_id) or PoolState(project_id)
    merged = tuple(dict.fromkeys([*state.archives, *rel]))
    if merged != state.archives:
        state = replace(state, archives=merged)
        save_state(data_root, state)
    elif not state_path(data_root, project_id).exists():
        save_state(data_root, state)
    return state
