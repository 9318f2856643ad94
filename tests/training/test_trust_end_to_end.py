"""End to end: a class trained on shuffled labels is judged `not learned`, and its flags are refused.

The same synthetic cohort as the accuracy test, but the biopsy_tool answers are dealt out at
random among the images (same count of positives, no relation to the pixels). `mammoflag train`
must say so first, the version's card must hold the verdict, and `mammoflag flag` must refuse
to flag that class unless told --allow-unreliable; the learned class is unaffected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ls_helpers import export_from_truth, import_synthetic, truth_by_key
from mammoflag.card import Verdict
from mammoflag.registry import Registry

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammoflag.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory, data_root, spec):
    from importers.synthetic import read_ground_truth

    work = tmp_path_factory.mktemp("shuffled-cohort")
    out, gt = import_synthetic(work, data_root, "shuffled-cohort", 60, seed=11, size=320, biopsy_rate=0.5,
                               mag_rate=0.4, compressions=("none",))
    truth = truth_by_key(read_ground_truth(gt))
    keys = sorted(truth)
    dealt = np.random.default_rng(5).permutation([truth[k]["biopsy_tool"] for k in keys])
    truth = {k: {**truth[k], "biopsy_tool": str(v)} for k, v in zip(keys, dealt)}
    export = work / "shuffled-export.json"
    export.write_text(json.dumps(export_from_truth(json.loads((out / "tasks.json").read_text()), truth, spec)))
    home = tmp_path_factory.mktemp("shuffled-home")
    # the accuracy test's small, quick settings: what is judged is the gate, not the network
    env = {**os.environ, "MAMMOFLAG_HOME": str(home), "MAMMOFLAG_INPUT_SIZE": "96", "MAMMOFLAG_TRAIN_EPOCHS": "6",
           "MAMMOFLAG_TRAIN_BATCH_SIZE": "16", "MAMMOFLAG_TRAIN_THREADS": "2",
           "MAMMOFLAG_TRAIN_PRETEXT_STEPS": "40"}
    trained = _run(env, "train", "--export", str(export), "--data-root", str(data_root), "--models",
                   str(home / "models"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    return env, home / "models", out, trained.stdout


def test_shuffled_labels_are_not_learned_and_said_first(shuffled):
    _, models, _, stdout = shuffled
    card = Registry(models).versions()[-1].card
    assert card.verdict("biopsy_tool") is not Verdict.LEARNED, card.trust.per_class["biopsy_tool"]
    first = stdout.splitlines()[:3]
    assert first[0] == "verdicts:" and any(line.strip().startswith("biopsy_tool: NOT LEARNED")
                                           or line.strip().startswith("biopsy_tool: INSUFFICIENT EVIDENCE")
                                           for line in first), stdout
    assert "AUROC" in card.trust.per_class["biopsy_tool"].reason


def test_flags_of_the_unlearned_class_are_refused(shuffled, tmp_path):
    env, models, data_dir, _ = shuffled
    refused = _run(env, "flag", str(data_dir), "--model", str(models), "--out", str(tmp_path / "flags.csv"),
                   "--classes", "biopsy_tool", "--no-progress")
    assert refused.returncode == 2 and "biopsy_tool" in refused.stderr and "AUROC" in refused.stderr
    assert not (tmp_path / "flags.csv").exists()
    anyway = _run(env, "flag", str(data_dir), "--model", str(models), "--out", str(tmp_path / "flags.csv"),
                  "--classes", "biopsy_tool", "--allow-unreliable", "--no-progress")
    assert anyway.returncode == 0, anyway.stderr
    rows = (tmp_path / "flags.csv").read_text().splitlines()
    header = rows[0].split(",")
    reliable = header.index("reliable_biopsy_tool")
    assert len(rows) > 1 and all(r.split(",")[reliable] == "0" for r in rows[1:])
