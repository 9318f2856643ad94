"""Hostile and broken input for `mammoflag import`: bombs, truncations, formulas, control characters, kills.

One small hostile archive is built once per module (tiny images: the whole file runs in seconds) and
imported with one worker under a 4 GB address-space limit. Asserted: the run completes, every file has
exactly one report row, nothing hostile is `imported` without a note, no CSV cell starts a formula,
and a SIGKILLed run leaves no decode process alive and no half-written file after its re-run.
"""

from __future__ import annotations

import csv
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from mammoflag.dicom.normalize import load_display_frames
from importers.synthetic import write_synthetic_cohort
from mammoflag.dicom.types import FailFile, NormalizeOptions
from mammoflag.datadir import clean_header_text
from mammoflag.fileio import FORMULA_PREFIXES

REPO = Path(__file__).resolve().parents[2]
MG = "1.2.840.10008.5.1.4.1.1.1.2"
SMALL = NormalizeOptions(long_side=64)
ADDRESS_SPACE_LIMIT = 4 * 2**30
FORMULAS = ('=HYPERLINK("http://evil.example/x","click")', "+SUM(1)", "-2+3", "@SUM(A1)", "\tTAB", "\rCR")


def dataset(rows: int = 96, cols: int = 80, **elements) -> tuple[Dataset, np.ndarray]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MG
    ds.SOPClassUID = MG
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "MG", "HOSTILE-PID", "Doe^Hostile"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    pixels = ((np.add.outer(np.arange(rows), np.arange(cols)) * 37) % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    for k, v in elements.items():
        setattr(ds, k, v)
    return ds, pixels


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def compressed(syntax, **elements) -> Dataset:
    ds, pixels = dataset(**elements)
    ds.compress(syntax, pixels, generate_instance_uid=False)
    return ds


def with_frame(ds: Dataset, stream: bytes) -> Dataset:
    ds.PixelData = encapsulate([stream + (b"\0" if len(stream) % 2 else b"")])
    return ds


def frame_of(ds: Dataset) -> bytes:
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def j2k_without_tiles(codestream: bytes) -> bytes:
    """The main header only (SOC SIZ COD QCD ...), then EOC: every tile-part cut out."""
    return codestream[:codestream.find(b"\xff\x90")] + b"\xff\xd9"


def j2k_with_siz_size(codestream: bytes, rows: int, cols: int) -> bytes:
    """The codestream with its SIZ image size patched (Xsiz at SOC+8, Ysiz at SOC+12)."""
    start = codestream.find(b"\xff\x4f\xff\x51")
    out = bytearray(codestream)
    out[start + 8:start + 12] = cols.to_bytes(4, "big")
    out[start + 12:start + 16] = rows.to_bytes(4, "big")
    return bytes(out)


def hostile_archive(root: Path) -> dict[str, str]:
    """Write the hostile files; returns {relative path: what it is} (the outcome each must not have)."""
    cases: dict[str, str] = {}

    def add(name: str, ds: Dataset, what: str) -> None:
        save(ds, root / name)
        cases[name] = what

    # decompression bombs: declared (tiny stream, huge Rows x Columns) for each codec family, and frames
    for syntax, tag in ((RLELossless, "rle"), (JPEGLSLossless, "jls"), (JPEG2000Lossless, "j2k")):
        ds = compressed(syntax)
        ds.Rows = ds.Columns = 60000
        add(f"bomb-declared-{tag}.dcm", ds, "bomb")
    ds, _ = dataset()
    ds.NumberOfFrames = 2_000_000  # 96 x 80 x 2 bytes x 2e6 frames: 30 GB declared
    add("bomb-frames.dcm", ds, "bomb")
    ds = compressed(JPEG2000Lossless)  # header says 96 x 80, the codestream's own SIZ 60000 x 60000
    add("bomb-j2k-siz.dcm", with_frame(ds, j2k_with_siz_size(frame_of(ds), 60000, 60000)), "bomb")
    # truncations of each codec
    for syntax, tag in ((RLELossless, "rle"), (JPEGLSLossless, "jls"), (JPEG2000Lossless, "j2k")):
        ds = compressed(syntax)
        stream = frame_of(ds)
        add(f"truncated-{tag}.dcm", with_frame(ds, stream[: int(len(stream) * 0.3)]), "truncated")
    ds = compressed(JPEG2000Lossless)
    add("truncated-j2k-tiles.dcm", with_frame(ds, j2k_without_tiles(frame_of(ds))), "truncated")
    ds, _ = dataset()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    add("truncated-native.dcm", ds, "truncated")
    # formulas and control characters in every copied field, and in file names
    for i, formula in enumerate(FORMULAS):
        view = Dataset()
        view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "R-10242", "SRT", "cranio-caudal"
        modifier = Dataset()
        modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = "X-1", formula[:16], formula
        view.ViewModifierCodeSequence = Sequence([modifier])
        ds, _ = dataset(Manufacturer=formula, ManufacturerModelName=formula + "\x00\x1b[31m",
                        ViewPosition=formula[:16], ImageLaterality=formula[:16], ImageType=["ORIGINAL", formula[:16]],
                        BurnedInAnnotation=formula[:16], ViewCodeSequence=Sequence([view]))
        name = f"{formula[:12].strip()}-{i}.dcm".replace("/", "_")
        add(name, ds, "formula")
    ds, _ = dataset()
    ds.StudyInstanceUID = "=cmd|' /C calc'!A0"
    add("bad-study-uid.dcm", ds, "bad uid")
    ds, _ = dataset()
    ds.SeriesInstanceUID = "../../etc"
    add("bad-series-uid.dcm", ds, "bad uid")
    ds, _ = dataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.3.=HYPERLINK"
    del ds.PixelData
    add("odd-sop-class.dcm", ds, "no pixels")
    ds, _ = dataset(PhotometricInterpretation="=EVIL PHOTOMETRIC")
    add("odd-photometric.dcm", ds, "bad photometric")
    (root / "plain.dcm").parent.mkdir(parents=True, exist_ok=True)
    save(dataset()[0], root / "good" / "plain.dcm")
    cases["good/plain.dcm"] = "good"
    return cases


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile") / "dicoms"
    return root, hostile_archive(root)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_no_formula_cells(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            for cell in row:
                assert not cell.startswith(FORMULA_PREFIXES), f"{path.name}: formula cell {cell!r}"


def limited_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMOFLAG_")}
    env.update(MAMMOFLAG_HOME=str(tmp_path / "home"), MAMMOFLAG_DATA_ROOT=str(tmp_path / "data"),
               MAMMOFLAG_PATIENT_KEY_SECRET="hostile-secret", PYTHONPATH=str(REPO))
    return env


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_import(dicom_dir: Path, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammoflag.cli", "import", str(dicom_dir), "--out", str(out),
                           "--workers", "1", "--long-side", "64", "--no-progress", *extra],
                          env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_address_space)


def test_hostile_archive_imports_under_4_gb_with_one_worker(archive, tmp_path):
    root, cases = archive
    out = tmp_path / "data" / "hostile"
    run = run_import(root, out, limited_env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    report = {r["path"]: r for r in read_csv(out / "import_report.csv")}
    # exactly one row per file (a file name that starts a formula is reported as a safe cell)
    assert len(report) == len(cases) == len(read_csv(out / "import_report.csv"))
    for name, what in cases.items():
        row = report[clean_header_text(name, max_chars=10_000)]
        if what in ("bomb", "truncated", "bad uid"):
            assert row["status"] == "failed", (name, row)
        if what == "bomb":
            assert "too large" in row["reason"] or "SIZ" in row["reason"], (name, row["reason"])
        if what == "truncated":
            assert "truncated" in row["reason"] or "cannot be decoded" in row["reason"], (name, row["reason"])
        if what == "bad uid":
            assert "not a valid UID" in row["reason"] and "Instance UID" in row["reason"], row
    assert report["good/plain.dcm"]["status"] == "imported"
    for name, what in cases.items():  # what is imported is good or merely odd text, cleaned
        row = report[clean_header_text(name, max_chars=10_000)]
        assert row["status"] != "imported" or what in ("good", "formula"), (name, row)
    # no CSV cell a spreadsheet would run, anywhere
    for csv_file in ("import_report.csv", "manifest.csv"):
        assert_no_formula_cells(out / csv_file)
    text = (out / "tasks.json").read_text() + (out / "import_report.csv").read_text() + run.stderr + run.stdout
    for raw in ("=HYPERLINK", "=cmd|", "=EVIL", "1.2.3.=HYPERLINK", "\x1b", "Doe^Hostile", "HOSTILE-PID"):
        assert raw not in text.replace("'=HYPERLINK", ""), raw
    assert not list(out.rglob("*.partial"))


def test_header_text_is_length_limited_and_without_control_characters(tmp_path):
    ds, _ = dataset(Manufacturer="A" * 60 + "\x00\x07\r\n\t" + "B" * 60, ManufacturerModelName="+cmd")
    hints = load_display_frames(save(ds, tmp_path / "x.dcm"), SMALL, "s").hints
    assert len(hints.manufacturer) <= 64 and not any(ord(c) < 32 for c in hints.manufacturer)
    assert hints.model == "'+cmd"


def test_real_frame_above_the_cap_is_refused_before_decoding(tmp_path):
    """A valid RLE stream whose frame exceeds the cap (here 1 MB, 96 x 80 x 2 bytes is 15 KB ... so 2 MB)."""
    ds, pixels = dataset(rows=1024, cols=1024)
    ds.compress(RLELossless, pixels, generate_instance_uid=False)
    path = save(ds, tmp_path / "big.dcm")
    with pytest.raises(FailFile, match=r"Rows \(0028,0010\) x Columns \(0028,0011\).*above the 1 MB cap"):
        load_display_frames(path, NormalizeOptions(long_side=64, max_frame_mb=1), "s")
    assert load_display_frames(path, SMALL, "s").frames  # under the default cap it imports


def test_unreadable_folder_is_one_report_row(tmp_path, monkeypatch):
    """As root chmod 000 does not stop listing: the listing itself is made to fail for one folder."""
    import importers.run as run

    root = tmp_path / "dicoms"
    save(dataset()[0], root / "ok" / "a.dcm")
    save(dataset()[0], root / "secret-Doe^Jane" / "b.dcm")
    real_scandir = os.scandir

    def scandir(path):
        if not isinstance(path, int) and Path(path).name.startswith("secret-"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(run.os, "scandir", scandir)
    summary = run.import_dicoms(root, tmp_path / "out", SMALL, "s", workers=1, progress=False)
    rows = read_csv(tmp_path / "out" / "import_report.csv")
    assert [(r["path"], r["status"]) for r in rows] == [("ok/a.dcm", "imported"), ("secret-Doe^Jane/", "failed")]
    assert "PermissionError" in rows[1]["reason"] and "Doe" not in rows[1]["reason"]
    assert summary.failed == 1


def test_a_full_disk_at_start_is_a_clear_error(tmp_path, monkeypatch):
    import sqlite3

    import importers.run as run

    def full(*_a, **_k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(run.sqlite3, "connect", full)
    save(dataset()[0], tmp_path / "d" / "a.dcm")
    with pytest.raises(run.ImportRunError, match="disk is full"):
        run.import_dicoms(tmp_path / "d", tmp_path / "out", SMALL, "s", workers=1, progress=False)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_import_leaves_no_process_and_its_rerun_no_partial_file(sig, tmp_path):
    dicom_dir = tmp_path / "cohort"
    write_synthetic_cohort(dicom_dir, 12, seed=3, size=256, compressions=["none"], multiframe=False)
    out = tmp_path / "data" / "killed"
    env = limited_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "mammoflag.cli", "import", str(dicom_dir), "--out", str(out),
                             "--workers", "2", "--long-side", "64", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and not (workers and list(out.glob("images/*/*.png"))):
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert workers, "no decode process was started"
    (out / "images" / "1.2.3").mkdir(parents=True, exist_ok=True)
    (out / "images" / "1.2.3" / "0.png.deadbeef.partial").write_bytes(b"half")  # as a kill mid-write leaves
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "decode processes outlived their parent"

    rerun = run_import(dicom_dir, out, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list(out.rglob("*.partial"))
    rows = read_csv(out / "import_report.csv")
    assert len(rows) == sum(1 for p in dicom_dir.rglob("*") if p.is_file())
