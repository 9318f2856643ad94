"""Peak memory of one import worker decoding one file: the largest detectors, the decode cap, bombs.

Each case is written once with pydicom (synthetic 12-bit pixels in 16-bit words), then decoded by
``load_display_frames`` in a fresh Python process (as an import worker does) whose peak resident
set (``VmHWM``) is reported, with the same process's baseline (imports done, nothing decoded)
beside it. Cases:

- ``fuji-4728x5928-{native,rle,jpegls}``: the largest mammography detector (Fujifilm Amulet, 50 um);
- ``cap-11584x11584-{native,rle}``: a frame just under the default 256 MB cap (the worst a worker
  accepts);
- ``bomb-declared-60000x60000-rle`` and ``bomb-real-16384x16384-rle``: refused before decoding.

    nice .venv/bin/python benchmarks/bench_decode_memory.py [--skip-cap]

Writes benchmarks/results/decode_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "decode_memory.json"

# VmHWM (the process's own peak resident set, reset by exec), not ru_maxrss: Linux carries a forking
# parent's peak over into ru_maxrss, and this script's parent holds the test images.
CHILD = r"""
import sys, json, time
from mammoflag.dicom.normalize import load_display_frames
from mammoflag.dicom.types import NormalizeOptions, FailFile
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = hwm_kb()
t = time.perf_counter()
try:
    load_display_frames(sys.argv[1], NormalizeOptions(), "bench-secret")
    outcome = "imported"
except FailFile as exc:
    outcome = "failed: " + exc.reason
peak = hwm_kb()
print(json.dumps({"baseline_mb": base / 1024, "peak_mb": peak / 1024, "seconds": time.perf_counter() - t,
                  "outcome": outcome}))
"""


def write_case(path: Path, rows: int, cols: int, syntax: str | None, declared: tuple[int, int] | None = None) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "MG", "BENCH"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    rng = np.random.default_rng(0)
    pixels = (np.add.outer(np.arange(rows, dtype=np.uint32) // 7, np.arange(cols, dtype=np.uint32) // 5) % 4088)
    pixels = (pixels + rng.integers(0, 8, size=(rows, cols), dtype=np.uint32)).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    if syntax == "rle":
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    elif syntax == "jpegls":
        ds.compress(JPEGLSLossless, pixels, generate_instance_uid=False)
    if declared:
        ds.Rows, ds.Columns = declared
    ds.save_as(path, enforce_file_format=True)
    return path


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=REPO,
                         timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-cap", action="store_true", help="leave out the two cap-sized cases (slow to write)")
    args = parser.parse_args()
    cases = [("fuji-4728x5928-native", 5928, 4728, None, None),
             ("fuji-4728x5928-rle", 5928, 4728, "rle", None),
             ("fuji-4728x5928-jpegls", 5928, 4728, "jpegls", None),
             ("bomb-declared-60000x60000-rle", 256, 256, "rle", (60000, 60000))]
    if not args.skip_cap:
        cases += [("cap-11584x11584-native", 11584, 11584, None, None),
                  ("cap-11584x11584-rle", 11584, 11584, "rle", None),
                  ("bomb-real-16384x16384-rle", 16384, 16384, "rle", None)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows, cols, syntax, declared in cases:
            started = time.perf_counter()
            path = write_case(Path(tmp) / f"{name}.dcm", rows, cols, syntax, declared)
            written = time.perf_counter() - started
            results[name] = {"rows": rows if not declared else declared[0], "cols": cols if not declared else declared[1],
                             "file_mb": path.stat().st_size / 2**20, "write_s": written, **measure(path)}
            print(name, json.dumps(results[name]), flush=True)
            path.unlink()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                               "cases": results}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
