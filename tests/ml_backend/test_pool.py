"""The labeling pool's pure core: cold-start sample, top-up plan, the rotating archive window."""

from __future__ import annotations

import csv
from pathlib import Path

from mammoflag.datadir import MANIFEST_COLUMNS
from ml_backend.pool import (Candidate, Cursor, PoolState, PoolTask, plan_cold_start, plan_top_up, read_window,
                             register_archives, save_state, load_state)

VENDORS = ["HOLOGIC", "GE", "SIEMENS", "FUJI"]


def rows(n: int, vendors=VENDORS) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out.append({"key": f"1.2.{i}:0", "image": f"images/{i}/0.png", "sop_instance_uid": f"1.2.{i}", "frame": "0",
                    "study_instance_uid": f"9.{i // 4}", "manufacturer": vendors[(i // 4) % len(vendors)],
                    "model": "m", "view_position": ["CC", "MLO"][i % 2], "laterality": ["L", "R"][(i // 2) % 2]})
    return out


def write_manifest(folder: Path, manifest_rows: list[dict[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(manifest_rows)
    return folder


def test_cold_start_is_stratified_deterministic_and_excludes():
    archive = rows(400) + rows(8, vendors=["RARE"])  # keys repeat the first 8 with another vendor: dedupe by key
    archive[-8:] = [{**r, "key": f"rare-{i}:0", "study_instance_uid": f"rare.{i // 4}"} for i, r in enumerate(archive[-8:])]
    sample = plan_cold_start(archive, 40)
    assert len(sample) == len(set(sample)) == 40
    by_key = {r["key"]: r for r in archive}
    vendors = {by_key[k]["manufacturer"] for k in sample}
    assert vendors == set(VENDORS) | {"RARE"}  # a vendor of 8 images out of 408 is in a sample of 40
    strata = {(by_key[k]["manufacturer"], by_key[k]["view_position"], by_key[k]["laterality"]) for k in sample}
    assert len(strata) == 20  # every (vendor, view, side) combination
    assert plan_cold_start(list(reversed(archive)), 40) == sample  # order of the archive does not matter
    again = plan_cold_start(archive, 40, exclude=set(sample[:10]))
    assert not set(again) & set(sample[:10]) and len(again) == 40
    assert plan_cold_start(archive, 0) == []


def test_top_up_fills_swaps_stale_and_never_touches_labelled():
    pool = [PoolTask(1, "a", labelled=True, confidence=0.99),  # labelled: stays whatever its score
            PoolTask(2, "b", labelled=False, confidence=0.95, study="s1"),  # stale
            PoolTask(3, "c", labelled=False, confidence=0.10, study="s2"),  # still uncertain
            PoolTask(4, "d", labelled=False, confidence=None),  # unreadable: stalest
            PoolTask(5, "e", labelled=False, confidence=0.99, removable=False)]  # kept this round
    candidates = [Candidate("x1", 0.05, "s9"), Candidate("x2", 0.06, "s9"), Candidate("x3", 0.5, "s8"),
                  Candidate("b", 0.0, "s1"), Candidate("x4", 0.97, "s7")]
    plan = plan_top_up(pool, candidates, bound=5)
    # one free slot (4 unlabeled, bound 5) takes the best candidate; then swaps while a candidate is less
    # certain than the stalest task; a candidate already in the project ("b") is never added
    assert plan.add[0] == "x1" and "b" not in plan.add and "x4" not in plan.add
    assert plan.remove == (4, 2)
    assert set(plan.add) == {"x1", "x3", "x2"}
    assert 1 not in plan.remove and 5 not in plan.remove and 3 not in plan.remove
    # diversity: x3 (another study) comes before x2 (second of study s9), though x2 is less certain
    assert plan.add.index("x3") < plan.add.index("x2")
    # at the bound with nothing better: no change (a re-run changes nothing)
    settled = [PoolTask(i, f"k{i}", False, 0.1) for i in range(5)]
    assert plan_top_up(settled, [Candidate("y", 0.5)], bound=5).changes == 0
    # a lowered bound sheds the stalest
    assert plan_top_up(settled[:4] + [PoolTask(9, "k9", False, 0.9)], [], bound=3).remove == (9, 3)


def test_window_rotates_over_every_archive_image_once_per_lap(tmp_path):
    root = tmp_path / "data"
    write_manifest(root / "a1", rows(25))
    write_manifest(root / "a2", [{**r, "key": f"b{r['key']}"} for r in rows(10)])
    state = register_archives(root, 7, [root / "a1", root / "a2"])
    assert register_archives(root, 7, [root / "a2"]) == state  # idempotent
    seen: list[str] = []
    for _ in range(7):
        window = read_window(root, state, 5, exclude=set())
        assert len(window.rows) == 5 and window.read == 5
        seen += [r["key"] for _, r in window.rows]
        state = PoolState(7, state.archives, window.cursor)
    assert len(set(seen)) == 35  # 35 rows, 5 per round: every image once in 7 rounds
    assert state.cursor.laps == 0 or state.cursor.laps == 1
    window = read_window(root, state, 5, exclude=set())
    assert {r["key"] for _, r in window.rows} <= set(seen) and window.cursor.laps == 1  # second lap
    # excluded keys (already in the project) do not count; a small archive is read at most once a round
    big = read_window(root, PoolState(7, state.archives), 100, exclude={"1.2.0:0"})
    assert len(big.rows) == 34 and big.read == 35
    save_state(root, PoolState(7, state.archives, Cursor(1, 99999, 3), "v1", 35))
    loaded = load_state(root, 7)
    assert loaded.topped_up_version == "v1" and loaded.cursor.laps == 3
    # a cursor that no longer falls on a line start (the manifest was rewritten) starts over
    window = read_window(root, loaded, 3, exclude=set())
    assert [r["key"] for _, r in window.rows] == ["b1.2.0:0", "b1.2.1:0", "b1.2.2:0"]


def test_a_window_cut_short_leaves_its_unscored_rows_first_in_the_next(tmp_path):
    """A round whose time budget ran out scored only a prefix of its window: the cursor moves past that
    prefix (and the excluded rows inside it), no further, so nothing is skipped and nothing scored twice."""
    root = tmp_path / "data"
    write_manifest(root / "a1", rows(12))
    write_manifest(root / "a2", [{**r, "key": f"b{r['key']}"} for r in rows(6)])
    state = register_archives(root, 8, [root / "a1", root / "a2"])
    exclude = {"1.2.1:0", "1.2.5:0"}
    order = [r["key"] for r in rows(12)] + [f"b{r['key']}" for r in rows(6)]  # manifest rows, archive by archive
    window = read_window(root, state, 8, exclude=exclude)
    keys = [r["key"] for _, r in window.rows]
    assert len(keys) == 8 and not exclude & set(keys)
    assert window.cut(len(keys)) == (window.cursor, window.read) and window.cut(0) == (state.cursor, 0)
    for k in (1, 3, 7):
        cursor, read = window.cut(k)
        assert read == order.index(keys[k - 1]) + 1  # the excluded rows before it were read too
        after = read_window(root, PoolState(8, state.archives, cursor), 8, exclude=exclude)
        assert [r["key"] for _, r in after.rows][:8 - k] == keys[k:]  # the unscored rows lead the next window
    # windows of 8 scored in prefixes of 4, round after round: every row exactly once per lap
    seen: list[str] = []
    for _ in range(4):
        window = read_window(root, state, 8, exclude=exclude)
        cursor, _ = window.cut(4)
        seen += [r["key"] for _, r in window.rows[:4]]
        state = PoolState(8, state.archives, cursor)
    assert len(seen) == len(set(seen)) == 16 and set(seen) == set(order) - exclude  # 18 rows, 2 excluded


def test_task_data_matches_the_importer(tmp_path):
    from importers.run import task_data
    from mammoflag.datadir import task_data_for_row

    row = {c: "" for c in MANIFEST_COLUMNS} | rows(1)[0] | {"view_modifiers": "magnification|spot_compression",
                                                            "rows": "100", "cols": "80"}
    assert task_data_for_row(row, tmp_path / "d", tmp_path) == task_data(row, tmp_path / "d", tmp_path)
