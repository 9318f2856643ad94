"""``mammoflag import --distributed`` with two real Celery workers through Redis, one SIGKILLed mid-shard:
the DATA_DIR equals a local run's (manifest, report, every display PNG), and a re-run changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from importers.run import import_dicoms
from mammoflag.dicom.types import NormalizeOptions
from shared_cohort import COHORT_LONG_SIDE, TEST_PATIENT_KEY_SECRET

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services]


def _running(jobs_root: Path) -> list[dict]:
    found = []
    for beat in jobs_root.glob("*/heartbeats/[0-9]*"):
        try:
            info = json.loads(beat.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if info["done"] < info["files"] and not (beat.parent.parent / "results" / f"{beat.name}.jsonl").exists():
            found.append(info)
    return found


def _images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def test_two_workers_one_killed_equal_a_local_import(synthetic_cohort, tmp_path, redis_url, celery_worker_factory):
    dicom_dir, _ = synthetic_cohort
    env = {"MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_BROKER_URL": redis_url,
           "MAMMOFLAG_PATIENT_KEY_SECRET": TEST_PATIENT_KEY_SECRET, "MAMMOFLAG_DATA_ROOT": str(tmp_path),
           "MAMMOFLAG_DISPLAY_LONG_SIDE": str(COHORT_LONG_SIDE)}
    workers = [celery_worker_factory(env, queues="flagging", name=f"import{i}") for i in range(2)]
    out = tmp_path / "distributed"
    cmd = [sys.executable, "-m", "mammoflag.cli", "import", str(dicom_dir), "--out", str(out), "--distributed",
           "--shard-size", "6", "--stall-timeout", "8", "--no-progress"]
    coordinator = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
    try:
        victim = None
        deadline = time.monotonic() + 180
        while victim is None:
            assert coordinator.poll() is None, coordinator.stdout.read().decode()
            assert time.monotonic() < deadline, "no shard started on a worker"
            for info in _running(out / ".import-jobs"):
                try:
                    group = os.getpgid(info["pid"])
                except ProcessLookupError:
                    continue
                victim = next((w for w in workers if w.pid == group), None)
                if victim:
                    os.killpg(victim.pid, signal.SIGKILL)  # the whole worker, as a machine gone
                    break
            time.sleep(0.01)
        victim.wait()
        output, _ = coordinator.communicate(timeout=300)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    text = output.decode()
    assert coordinator.returncode == 0, text
    assert "sending it again" in text  # the dead worker's shard went to the other worker

    local = tmp_path / "local"
    import_dicoms(dicom_dir, local, NormalizeOptions(long_side=COHORT_LONG_SIDE), TEST_PATIENT_KEY_SECRET,
                  data_root=tmp_path, workers=1, progress=False)
    assert (out / "manifest.csv").read_text() == (local / "manifest.csv").read_text()
    assert (out / "import_report.csv").read_text() == (local / "import_report.csv").read_text()
    assert _images(out) == _images(local)  # one PNG per frame, byte for byte; no temporary file left
    assert not list(out.rglob("*.partial")) and not (out / ".import-jobs").exists()
    report_rows = (out / "import_report.csv").read_text().splitlines()[1:]
    assert len(report_rows) == len([p for p in dicom_dir.rglob("*") if p.is_file()])  # one row per input file

    # running it again changes nothing: every file is resumed, no frame added
    again = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (out / "manifest.csv").read_text() == (local / "manifest.csv").read_text()
    assert _images(out) == _images(local)
