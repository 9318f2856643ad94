"""The import run as a whole: files per second over processes, and parent memory over file count.

1. Throughput: N synthetic full-field Hologic-like mammograms (4096 x 3328, uncompressed, written by
   importers.synthetic) imported with ``import_dicoms`` at display long side 1024, with 1 and 2
   worker processes: seconds per file (wall) and files per second. This is the whole run: walk,
   decode, normalize, PNG write, manifest, report, tasks.json.
2. Memory: many tiny files (64 px) imported with 2 workers; the parent's peak Python heap
   (tracemalloc) for a small and a 10x larger cohort. Flat means the parent holds no per-file
   results: manifest keys, claimed SOP UIDs and earlier report rows live in a scratch SQLite file
   (DATA_DIR/.import-state.sqlite; its page cache, ~2 MiB, is outside the Python heap), so the peak
   should not grow with the file count (before that store: ~1.4 KiB per file).
3. Synthetic generator speed: seconds for a few dozen images at 256 px.

    nice .venv/bin/python benchmarks/bench_import.py [--full-field 12] [--small 200] [--large 2000]

Writes benchmarks/results/import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from importers.run import import_dicoms  # noqa: E402
from importers.synthetic import write_synthetic_cohort  # noqa: E402
from mammoflag.dicom.types import NormalizeOptions  # noqa: E402


def full_field_cohort(folder: Path, n_files: int) -> Path:
    write_synthetic_cohort(folder, n_files, seed=1, size=None, images_per_study=(1, 1), vendors=["hologic"],
                           compressions=["none"], for_processing_every=0, multiframe=False)
    return folder


def throughput(folder: Path, n_files: int, workers: int, work: Path) -> dict:
    out = work / f"out-w{workers}"
    started = time.perf_counter()
    summary = import_dicoms(folder, out, NormalizeOptions(long_side=1024), "bench-secret", workers=workers,
                            progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return {"workers": workers, "files": n_files, "imported": summary.imported, "seconds": round(seconds, 2),
            "seconds_per_file": round(seconds / n_files, 4), "files_per_second": round(n_files / seconds, 2)}


def parent_memory(n_studies: int, work: Path) -> dict:
    folder = work / f"tiny-{n_studies}"
    write_synthetic_cohort(folder, n_studies, seed=2, size=64, images_per_study=(4, 4), compressions=["none"],
                           multiframe=False)
    out = work / f"tiny-out-{n_studies}"
    tracemalloc.start()
    started = time.perf_counter()
    summary = import_dicoms(folder, out, NormalizeOptions(long_side=64), "bench-secret", workers=2,
                            progress=False)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shutil.rmtree(out)
    shutil.rmtree(folder)
    return {"files": summary.files, "parent_peak_python_heap_mib": round(peak / 2**20, 2),
            "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-field", type=int, default=12, help="full-field files for the throughput run")
    ap.add_argument("--small", type=int, default=50, help="studies (x4 files) of the small memory run")
    ap.add_argument("--large", type=int, default=500, help="studies (x4 files) of the large memory run")
    args = ap.parse_args()
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        write_synthetic_cohort(work / "synth", 12, seed=0, size=256)
        results["synthetic_12_studies_256px_seconds"] = round(time.perf_counter() - started, 2)
        shutil.rmtree(work / "synth")

        started = time.perf_counter()
        folder = full_field_cohort(work / "full", args.full_field)
        results["synthetic_full_field_seconds_per_image"] = round((time.perf_counter() - started) / args.full_field, 2)
        results["throughput"] = [throughput(folder, args.full_field, w, work) for w in (1, 2)]
        shutil.rmtree(folder)

        results["parent_memory"] = [parent_memory(args.small, work), parent_memory(args.large, work)]
    print(json.dumps(results, indent=2))
    out = REPO / "benchmarks" / "results" / "import.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
