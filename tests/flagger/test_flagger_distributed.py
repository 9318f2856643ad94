"""`--distributed` with two real Celery workers through Redis, one SIGKILLed mid-shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger_cohorts import BIOPSY, BOTH, FAINT, NOTHING, read_csv, write_display_cohort
from mammoflag.registry import resolve_model
from shared_cohort import COHORT_LONG_SIDE, TEST_PATIENT_KEY_SECRET

REPO = Path(__file__).resolve().parents[2]


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running_heartbeats(jobs_root: Path) -> list[tuple[Path, dict]]:
    """Heartbeats of shards started and not finished yet."""
    found = []
    for beat in jobs_root.glob("*/heartbeats/[0-9]*"):
        result = beat.parent.parent / "results" / f"{beat.name}.jsonl"
        try:
            info = json.loads(beat.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if not result.exists() and info["done"] < info["units"]:
            found.append((beat, info))
    return found


@pytest.mark.services
@pytest.mark.parametrize("kill", ["whole-worker", "pool-process"])
def test_two_workers_one_killed_mid_shard_equal_single_process(kill, tiny_registry, tmp_path, redis_url,
                                                               celery_worker_factory):
    """whole-worker: the machine is gone, the coordinator sends the shard again when its heartbeat stops.
    pool-process: the process running the shard dies; Celery (acks_late, reject_on_worker_lost) puts the
    message back at once, so the coordinator's resend is switched off (long stall timeout) to prove it."""
    pattern = [NOTHING, BIOPSY, FAINT, NOTHING, BOTH, NOTHING, FAINT]
    studies = [pattern[s % len(pattern):][:3] + [NOTHING] for s in range(60)]
    data = write_display_cohort(tmp_path / "data", studies, size=(320, 256), seed=11)
    total = sum(len(s) for s in studies)
    env = {"MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_BROKER_URL": redis_url,
           "MAMMOFLAG_LOG_LEVEL": "INFO"}
    workers = [celery_worker_factory(env, queues="flagging", name=f"flag{i}") for i in range(2)]

    out = tmp_path / "out"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "mammoflag.cli", "flag", str(data), "--model", str(tiny_registry),
         "--out", str(out / "flags.csv"), "--images-out", str(out / "images.csv"), "--distributed",
         "--shard-size", "24", "--batch-size", "4", "--stall-timeout", "10" if kill == "whole-worker" else "900",
         "--no-progress"],
        cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        jobs_root = out / "flags.checkpoint.sqlite.jobs"
        victim = None
        deadline = time.monotonic() + 180
        while victim is None:
            assert coordinator.poll() is None, coordinator.stdout.read().decode()
            assert time.monotonic() < deadline, "no shard started on a worker"
            for beat, info in _running_heartbeats(jobs_root):
                group = _process_group(info["pid"])
                victim = next((w for w in workers if w.pid == group), None)
                if victim:
                    if kill == "whole-worker":
                        os.killpg(victim.pid, signal.SIGKILL)  # main process and pool child at once
                    else:
                        os.kill(info["pid"], signal.SIGKILL)  # only the pool process running the shard
                    killed_shard = beat
                    break
            time.sleep(0.01)
        if kill == "whole-worker":
            victim.wait()
        assert not (killed_shard.parent.parent / "results" / f"{killed_shard.name}.jsonl").exists()
        output, _ = coordinator.communicate(timeout=240)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    text = output.decode()
    assert coordinator.returncode == 0, text
    if kill == "whole-worker":
        assert "sending it again" in text  # the dead worker's shard was sent again
    else:
        assert "sending it again" not in text  # Celery redelivered it by itself

    single = FlagOutputs(tmp_path / "single" / "flags.csv", images=tmp_path / "single" / "images.csv")
    flag_cohort(data, resolve_model(tiny_registry), single, options=FlagOptions(workers=0, progress=False))
    assert (out / "flags.csv").read_text() == single.flags.read_text()
    distributed_images = read_csv(out / "images.csv")
    assert len(distributed_images) == total and len({r["key"] for r in distributed_images}) == total
    assert distributed_images == read_csv(single.images)
    assert read_csv(out / "flags.errors.csv") == []
    assert not list(jobs_root.glob("*/results/*"))  # the job folder was cleaned up


def _run_distributed(data: Path, registry: Path, out: Path, env: dict[str, str], *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mammoflag.cli", "flag", str(data), "--model", str(registry),
         "--out", str(out / "flags.csv"), "--images-out", str(out / "images.csv"), "--distributed",
         "--shard-size", "8", "--batch-size", "4", "--no-progress", *extra],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.services
def test_distributed_dicom_folder_equals_a_local_run(synthetic_cohort, tiny_registry, tmp_path, redis_url,
                                                     celery_worker_factory):
    """Workers normalize the DICOMs themselves, with their own copy of the patient-key secret."""
    dicom_dir, _ = synthetic_cohort
    base = {"MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_BROKER_URL": redis_url,
            "MAMMOFLAG_DISPLAY_LONG_SIDE": str(COHORT_LONG_SIDE)}
    for i in range(2):
        celery_worker_factory({**base, "MAMMOFLAG_PATIENT_KEY_SECRET": TEST_PATIENT_KEY_SECRET},
                              queues="flagging", name=f"dicom{i}")
    out = tmp_path / "out"
    _run_distributed(dicom_dir, tiny_registry, out, base)  # the coordinator itself needs no secret

    local = FlagOutputs(tmp_path / "local" / "flags.csv", images=tmp_path / "local" / "images.csv")
    flag_cohort(dicom_dir, resolve_model(tiny_registry), local, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                options=FlagOptions(workers=0, progress=False, display_long_side=COHORT_LONG_SIDE))
    assert read_csv(out / "flags.csv") == read_csv(local.flags)
    assert read_csv(out / "images.csv") == read_csv(local.images)
    assert read_csv(out / "flags.errors.csv") == read_csv(local.errors_path)


@pytest.mark.services
def test_distributed_dicom_on_workers_without_the_secret_names_it(synthetic_cohort, tiny_registry, tmp_path,
                                                                  redis_url, celery_worker_factory):
    """A worker without MAMMOFLAG_PATIENT_KEY_SECRET cannot compute patient keys: every unit is reported,
    with the variable's name, and the secret's value never appears anywhere."""
    secret = TEST_PATIENT_KEY_SECRET
    dicom_dir, ground_truth = synthetic_cohort
    env = {"MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_BROKER_URL": redis_url,
           "MAMMOFLAG_PATIENT_KEY_SECRET": ""}
    worker = celery_worker_factory(env, queues="flagging", name="nosecret")
    out = tmp_path / "out"
    text = _run_distributed(dicom_dir, tiny_registry, out, env)

    errors = read_csv(out / "flags.errors.csv")
    files = {g["file"] for g in ground_truth}
    assert len(errors) >= len(files)  # every DICOM file is accounted for (plus the cohort's non-DICOM files)
    assert all("MAMMOFLAG_PATIENT_KEY_SECRET is not set" in e["reason"] for e in errors), errors[:3]
    assert read_csv(out / "flags.csv") == []
    for where in (text, (out / "flags.errors.csv").read_text(), worker.log_path.read_text()):
        assert secret not in where
