"""`mammoflag import dicomweb+http://...` against a real Orthanc with its DICOMweb plugin.

The archive is loaded through Orthanc's REST API with synthetic mammograms (uncompressed, RLE, JPEG
2000, JPEG-LS, JPEG lossless, a multi-frame file, a FOR PROCESSING image); importing it must give
what importing the same files from a folder gives. Orthanc runs on free loopback ports with a
temporary storage folder and a user with a random password (tests/orthanc_server.py).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pydicom
import pytest

from importers.synthetic import read_ground_truth, write_synthetic_cohort
from mammoflag.cli import main
from orthanc_server import OrthancServer, orthanc_available

pytestmark = [pytest.mark.orthanc,
              pytest.mark.skipif(not orthanc_available() and not os.environ.get("CI"),
                                 reason="Orthanc is not installed: scripts/bootstrap --browser installs it")]

LONG_SIDE = "128"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(folder of the first 6 studies, folder of 2 more studies): DICOM files with every compression."""
    root = tmp_path_factory.mktemp("dicomweb-cohort")
    first, later = root / "first", root / "later"
    write_synthetic_cohort(first, 6, seed=21, size=256)
    write_synthetic_cohort(later, 2, seed=22, size=256)
    return first, later


@pytest.fixture
def env(monkeypatch, tmp_path):
    data_root = tmp_path / "data-root"
    data_root.mkdir()
    for var in [v for v in os.environ if v.startswith("MAMMOFLAG_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("MAMMOFLAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAMMOFLAG_DATA_ROOT", str(data_root))
    monkeypatch.setenv("MAMMOFLAG_PATIENT_KEY_SECRET", "dicomweb-test-secret")
    return data_root


def _login(monkeypatch, server: OrthancServer) -> None:
    monkeypatch.setenv("MAMMOFLAG_DICOMWEB_USER", server.user)
    monkeypatch.setenv("MAMMOFLAG_DICOMWEB_PASSWORD", server.password)


def _import(source: str | Path, out: Path, *extra: str) -> int:
    return main(["import", str(source), "--out", str(out), "--long-side", LONG_SIDE, "--no-progress",
                 "--workers", "2", *extra])


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "ground_truth.csv")


def _png_difference(key: str, web: bytes, folder: bytes) -> str:
    """What differs between two display PNGs of one instance: the pixels, or only their encoding (a failure
    once seen and not reproduced: this says which, for whoever sees it next)."""
    import cv2
    import numpy as np

    pa, pb = (cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_UNCHANGED) for x in (web, folder))
    if pa is None or pb is None:
        return f"{key}: a PNG does not decode (web {pa is not None}, folder {pb is not None})"
    if pa.shape != pb.shape:
        return f"{key}: shapes differ, web {pa.shape} folder {pb.shape}"
    diff = np.abs(pa.astype(int) - pb.astype(int))
    if not diff.any():
        return f"{key}: same pixels, different encoding ({len(web)} vs {len(folder)} bytes)"
    rows = np.flatnonzero(diff.any(axis=1))
    return (f"{key}: {int((diff > 0).sum())} pixels differ (max {int(diff.max())}) in rows {rows[0]}-{rows[-1]} "
            f"of {pa.shape[0]}")


def _assert_same_import(web: Path, folder: Path, sops: set[str]) -> None:
    """Same manifest rows, same display pixels, same tasks (but for the DATA_DIR in the URL), same statuses."""
    web_manifest = {r["key"]: r for r in _read_csv(web / "manifest.csv")}
    dir_manifest = {r["key"]: r for r in _read_csv(folder / "manifest.csv")}
    assert web_manifest == dir_manifest
    assert {r["sop_instance_uid"] for r in web_manifest.values()} == sops
    for row in web_manifest.values():
        a, b = (web / row["image"]).read_bytes(), (folder / row["image"]).read_bytes()
        assert a == b, _png_difference(row["key"], a, b)

    def tasks(data_dir: Path) -> dict[str, dict]:
        out = {}
        for task in json.loads((data_dir / "tasks.json").read_text()):
            data = dict(task["data"])
            assert data["image"].startswith(f"/data/local-files/?d={data_dir.name}/")
            data["image"] = data["image"].replace(f"?d={data_dir.name}/", "?d=")
            out[data["key"]] = data
        return out

    assert tasks(web) == tasks(folder)
    web_report = _read_csv(web / "import_report.csv")
    dir_report = [r for r in _read_csv(folder / "import_report.csv") if not r["path"].endswith("ground_truth.csv")]
    assert len(web_report) == len(dir_report) == len(sops)
    by_sop = {r["sop_instance_uid"]: r for r in dir_report}
    for row in web_report:
        twin = by_sop[row["sop_instance_uid"]]
        assert row["path"] == (f"studies/{row['study_instance_uid']}/series/"
                               f"{_series_of(web_manifest, row['sop_instance_uid'])}/instances/{row['sop_instance_uid']}")
        assert (row["status"], row["reason"], row["frames"]) == (twin["status"], twin["reason"], twin["frames"])
        assert [n for n in row["notes"].split("|") if n and n != "resumed"] == \
            [n for n in twin["notes"].split("|") if n and n != "resumed"]
    assert not (web / ".dicomweb-retrieved").exists()
    assert not [p for p in web.rglob("*") if p.is_file() and p.suffix in (".dcm", ".partial")]


def _series_of(manifest: dict[str, dict], sop: str) -> str:
    return next(r["series_instance_uid"] for r in manifest.values() if r["sop_instance_uid"] == sop)


def _sops(folder: Path) -> set[str]:
    return {r["sop_instance_uid"] for r in read_ground_truth(folder / "ground_truth.csv")}


def _identifiers(folder: Path) -> set[str]:
    found = set()
    for path in _dicom_files(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate"):
            value = str(ds.get(keyword, "") or "")
            found.update(part for part in [value, *value.replace("^", " ").split()] if len(part) >= 5)
    return found


def test_import_from_orthanc_equals_import_from_the_folder(archive, env, tmp_path, monkeypatch, capsys, caplog):
    first, later = archive
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        assert server.upload_folder(first) == len(_dicom_files(first))
        syntaxes = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
                    for p in _dicom_files(first)}
        assert syntaxes == {True, False}, "the archive holds compressed and uncompressed instances"
        web, folder = env / "web", env / "folder"

        # wrong credentials, then none: a clear error naming the URL, never a credential
        monkeypatch.setenv("MAMMOFLAG_DICOMWEB_USER", server.user)
        monkeypatch.setenv("MAMMOFLAG_DICOMWEB_PASSWORD", "not-the-password")
        assert _import(server.dicomweb_url, web) == 2
        err = capsys.readouterr().err
        assert "401" in err and f"127.0.0.1:{server.http_port}/dicom-web/studies" in err
        assert "not-the-password" not in err and server.password not in err and "MAMMOFLAG_DICOMWEB_USER" in err
        monkeypatch.delenv("MAMMOFLAG_DICOMWEB_USER")
        monkeypatch.delenv("MAMMOFLAG_DICOMWEB_PASSWORD")
        assert _import(server.dicomweb_url, web) == 2
        assert "set MAMMOFLAG_DICOMWEB_USER and MAMMOFLAG_DICOMWEB_PASSWORD" in capsys.readouterr().err
        # a user without a password: the missing secret is named before any request
        monkeypatch.setenv("MAMMOFLAG_DICOMWEB_USER", server.user)
        assert _import(server.dicomweb_url, web) == 2
        assert "MAMMOFLAG_DICOMWEB_PASSWORD" in capsys.readouterr().err
        # credentials in the URL are refused without being repeated
        leaky = server.dicomweb_url.replace("://", f"://{server.user}:{server.password}@")
        assert _import(leaky, web) == 2
        assert server.password not in capsys.readouterr().err

        _login(monkeypatch, server)
        keep = tmp_path / "kept"
        caplog.set_level(logging.DEBUG)
        assert main(["--log-level", "DEBUG", "import", server.dicomweb_url, "--out", str(web), "--long-side",
                     LONG_SIDE, "--no-progress", "--workers", "2", "--keep-dicom", str(keep),
                     "--query", "StudyDate=19000101-29991231"]) == 0
        printed = capsys.readouterr()
        assert "instances:" in printed.out
        # no patient identifiers or credentials in what was logged, printed or written
        identifiers = _identifiers(first)
        assert len(identifiers) > 10
        texts = [caplog.text, printed.out + printed.err] + \
            [(web / name).read_text() for name in ("tasks.json", "manifest.csv", "import_report.csv")]
        for text in texts:
            assert not [i for i in identifiers if i in text] and server.password not in text
        assert _import(first, folder) == 0
        _assert_same_import(web, folder, _sops(first))
        # --keep-dicom kept every retrieved instance byte for byte
        originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.read_bytes()
                     for p in _dicom_files(first)}
        kept = {p.stem: p.read_bytes() for p in keep.rglob("*.dcm")}
        assert kept == originals

        # a re-run retrieves and imports nothing new
        manifest_before = (web / "manifest.csv").read_text()
        assert _import(server.dicomweb_url, web) == 0
        printed = capsys.readouterr().out
        assert "0 new frames" in printed
        assert (web / "manifest.csv").read_text() == manifest_before
        report = _read_csv(web / "import_report.csv")
        assert report and all("resumed" in r["notes"] for r in report)

        # a study added to the archive later is picked up by the next run, and only it is retrieved
        server.upload_folder(later)
        assert _import(server.dicomweb_url, web) == 0
        report = _read_csv(web / "import_report.csv")
        new = [r for r in report if "resumed" not in r["notes"]]
        assert {r["sop_instance_uid"] for r in new} == _sops(later)
        both = tmp_path / "both"
        shutil.copytree(first, both / "first")
        shutil.copytree(later, both / "later")
        assert _import(both, env / "both") == 0
        _assert_same_import(web, env / "both", _sops(first) | _sops(later))

        # --modality selects: nothing in this archive is CT
        assert _import(server.dicomweb_url, env / "ct", "--modality", "CT") == 0
        assert _read_csv(env / "ct" / "import_report.csv") == []
    finally:
        server.stop()


def test_server_stopped_mid_run_then_resumed(archive, env, tmp_path, monkeypatch, capsys):
    """Orthanc goes away after a few instances: the run stops with a clear error; started again, it resumes."""
    from mammoflag.dicomweb import DicomWebClient

    first, _ = archive
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        server.upload_folder(first)
        _login(monkeypatch, server)
        monkeypatch.setenv("MAMMOFLAG_DICOMWEB_RETRIES", "2")
        real = DicomWebClient.retrieve_to_file
        calls = {"n": 0}

        def stop_after_four(self, ref, path):
            calls["n"] += 1
            if calls["n"] == 5:
                server.stop()  # the real server, really gone
            return real(self, ref, path)

        monkeypatch.setattr(DicomWebClient, "retrieve_to_file", stop_after_four)
        web = env / "web"
        assert main(["import", server.dicomweb_url, "--out", str(web), "--long-side", LONG_SIDE, "--no-progress",
                     "--workers", "1", "--concurrency", "1"]) == 2
        err = capsys.readouterr().err
        assert "did not answer" in err and "run the same command again" in err and server.password not in err
        assert not (web / ".dicomweb-retrieved").exists()
        partial = _read_csv(web / "import_report.csv.partial")
        assert 1 <= sum(r["status"] == "imported" for r in partial) <= 4

        monkeypatch.setattr(DicomWebClient, "retrieve_to_file", real)
        server.start()
        assert _import(server.dicomweb_url, web) == 0
        report = _read_csv(web / "import_report.csv")
        resumed = {r["sop_instance_uid"] for r in report if "resumed" in r["notes"]}
        assert resumed == {r["sop_instance_uid"] for r in partial if r["status"] == "imported"}
        assert _import(first, env / "folder") == 0
        _assert_same_import(web, env / "folder", _sops(first))
    finally:
        server.stop()
