"""`mammoflag flag dicomweb+http://...`: a whole archive flagged where it lives (a real Orthanc), as from its files."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger.distributed import _take_shard
from flagger.records import UnitKind, WorkUnit
from flagger.sources import DicomWebInput
from flagger_cohorts import read_csv
from importers.synthetic import write_synthetic_cohort
from mammoflag.dicomweb import DicomWebAuth, DicomWebSource, RetryPolicy
from mammoflag.registry import resolve_model
from mammoflag.settings import Secret
from orthanc_server import OrthancServer, orthanc_available
from shared_cohort import TEST_PATIENT_KEY_SECRET

REPO = Path(__file__).resolve().parents[2]
LONG_SIDE = 128
installed = pytest.mark.skipif(not orthanc_available() and not os.environ.get("CI"),
                               reason="Orthanc is not installed: scripts/bootstrap --browser installs it")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(folder, running Orthanc holding the folder's files)."""
    root = tmp_path_factory.mktemp("flag-dicomweb")
    folder = root / "dicom"
    write_synthetic_cohort(folder, 5, seed=31, size=256)
    server = OrthancServer(root / "orthanc").start()
    try:
        server.upload_folder(folder)
        yield folder, server
    finally:
        server.stop()


def _archive_input(server: OrthancServer, password: str | None = None) -> DicomWebInput:
    auth = DicomWebAuth(server.user, Secret("MAMMOFLAG_DICOMWEB_PASSWORD", "test", password or server.password))
    return DicomWebInput(DicomWebSource.parse(server.dicomweb_url), auth, RetryPolicy(attempts=2, backoff_s=0.1))


def _wado_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mammoflag-wado-*")}


@pytest.mark.orthanc
@installed
def test_flagging_the_archive_equals_flagging_its_files(archive, tiny_registry, tmp_path):
    folder, server = archive
    version = resolve_model(tiny_registry)
    options = FlagOptions(workers=2, batch_size=8, progress=False, display_long_side=LONG_SIDE)
    before = _wado_dirs()
    web = FlagOutputs(tmp_path / "web" / "flags.csv", images=tmp_path / "web" / "images.csv")
    summary = flag_cohort(_archive_input(server), version, web, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                          options=options)
    files = FlagOutputs(tmp_path / "files" / "flags.csv", images=tmp_path / "files" / "images.csv")
    flag_cohort(folder, version, files, patient_key_secret=TEST_PATIENT_KEY_SECRET, options=options)

    assert read_csv(web.flags) == read_csv(files.flags)
    assert read_csv(web.images) == read_csv(files.images)
    assert read_csv(web.errors_path) == []  # the folder's ground_truth.csv is not in the archive
    assert summary.input_kind is UnitKind.DICOMWEB and summary.units_total == summary.units_processed > 0
    assert _wado_dirs() <= before, "no retrieved instance is left on disk"

    again = flag_cohort(_archive_input(server), version, web, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                        options=options)
    assert again.units_processed == 0 and again.units_done_before == summary.units_total
    assert read_csv(web.flags) == read_csv(files.flags)


@pytest.mark.orthanc
@installed
def test_wrong_credentials_stop_the_flagging_run_clearly(archive, tiny_registry, tmp_path):
    from mammoflag.dicomweb import DicomWebAccessError

    _, server = archive
    with pytest.raises(DicomWebAccessError) as caught:
        flag_cohort(_archive_input(server, password="wrong-password"), resolve_model(tiny_registry),
                    FlagOutputs(tmp_path / "flags.csv"), patient_key_secret=TEST_PATIENT_KEY_SECRET,
                    options=FlagOptions(workers=0, progress=False))
    text = str(caught.value)
    assert "401" in text and f"127.0.0.1:{server.http_port}/dicom-web/studies" in text
    assert "wrong-password" not in text and server.password not in text


def test_distributed_shards_never_split_a_study():
    def unit(study: int, n: int) -> WorkUnit:
        return WorkUnit(f"studies/1.{study}/series/2.{study}/instances/3.{study}.{n}", UnitKind.DICOMWEB, "")

    units = iter([unit(s, n) for s, count in ((1, 3), (2, 1), (3, 4), (4, 2)) for n in range(count)])
    held: list[WorkUnit] = []
    shards = []
    while chunk := _take_shard(units, 2, held):
        shards.append([u.unit_id.split("/")[1] for u in chunk])
    assert shards == [["1.1"] * 3, ["1.2", "1.3", "1.3", "1.3", "1.3"], ["1.4"] * 2]
    plain = iter([WorkUnit(str(i), UnitKind.DICOM, "") for i in range(5)])
    held = []
    sizes = []
    while chunk := _take_shard(plain, 2, held):
        sizes.append(len(chunk))
    assert sizes == [2, 2, 1]


@pytest.mark.services
@pytest.mark.orthanc
@installed
def test_distributed_flagging_of_the_archive_equals_a_local_run(archive, tiny_registry, tmp_path, redis_url,
                                                                celery_worker_factory):
    """The coordinator lists the archive; workers retrieve their shards' studies with their own credentials."""
    folder, server = archive
    base = {"MAMMOFLAG_HOME": str(tmp_path / "home"), "MAMMOFLAG_BROKER_URL": redis_url,
            "MAMMOFLAG_DISPLAY_LONG_SIDE": str(LONG_SIDE), "MAMMOFLAG_DICOMWEB_USER": server.user,
            "MAMMOFLAG_DICOMWEB_PASSWORD": server.password}
    celery_worker_factory({**base, "MAMMOFLAG_PATIENT_KEY_SECRET": TEST_PATIENT_KEY_SECRET}, queues="flagging",
                          name="web0")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mammoflag.cli", "flag", server.dicomweb_url, "--model", str(tiny_registry),
         "--out", str(out / "flags.csv"), "--images-out", str(out / "images.csv"), "--distributed",
         "--shard-size", "4", "--batch-size", "4", "--no-progress"],
        cwd=REPO, env={**os.environ, **base}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert server.password not in proc.stdout + proc.stderr

    local = FlagOutputs(tmp_path / "local" / "flags.csv", images=tmp_path / "local" / "images.csv")
    flag_cohort(folder, resolve_model(tiny_registry), local, patient_key_secret=TEST_PATIENT_KEY_SECRET,
                options=FlagOptions(workers=0, progress=False, display_long_side=LONG_SIDE))
    assert read_csv(out / "flags.csv") == read_csv(local.flags)
    assert read_csv(out / "images.csv") == read_csv(local.images)
    assert read_csv(out / "flags.errors.csv") == []
