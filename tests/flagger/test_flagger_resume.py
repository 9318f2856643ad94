"""An interrupted run resumes: kill `mammoflag flag` mid-way, run it again, get what one clean run gets."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger_cohorts import BIOPSY, BOTH, FAINT, NOTHING, read_csv, write_display_cohort
from mammoflag.registry import resolve_model

REPO = Path(__file__).resolve().parents[2]


def _cli(data: Path, registry: Path, out_dir: Path, home: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mammoflag.cli", "flag", str(data), "--model", str(registry),
           "--out", str(out_dir / "flags.csv"), "--images-out", str(out_dir / "images.csv"),
           "--workers", "1", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "MAMMOFLAG_HOME": str(home)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _done_units(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        with sqlite3.connect(checkpoint, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_registry, tmp_path):
    pattern = [NOTHING, BIOPSY, FAINT, NOTHING, BOTH, NOTHING, NOTHING, FAINT]
    studies = [pattern[s % len(pattern):][:3] + [NOTHING] for s in range(90)]
    data = write_display_cohort(tmp_path / "data", studies, size=(320, 256), seed=7)
    total = sum(len(s) for s in studies)
    out = tmp_path / "out"
    checkpoint = out / "flags.checkpoint.sqlite"

    run = _cli(data, tiny_registry, out, tmp_path / "home")
    deadline = time.monotonic() + 120
    while _done_units(checkpoint) < 20:
        assert run.poll() is None, run.stdout.read().decode()
        assert time.monotonic() < deadline, "flagging made no progress"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    done_at_kill = _done_units(checkpoint)
    assert 20 <= done_at_kill < total, "the run finished before it could be interrupted"
    assert not (out / "flags.csv").exists()

    rerun = _cli(data, tiny_registry, out, tmp_path / "home")
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output.decode()
    assert f"{done_at_kill} already done" in output.decode()

    clean = FlagOutputs(tmp_path / "clean" / "flags.csv", images=tmp_path / "clean" / "images.csv")
    flag_cohort(data, resolve_model(tiny_registry), clean, options=FlagOptions(workers=0, progress=False))
    assert (out / "flags.csv").read_text() == clean.flags.read_text()
    resumed_images, clean_images = read_csv(out / "images.csv"), read_csv(clean.images)
    assert len(resumed_images) == total  # nothing lost, nothing twice
    assert resumed_images == clean_images
    assert read_csv(out / "flags.errors.csv") == []
