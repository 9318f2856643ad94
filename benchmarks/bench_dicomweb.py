"""DICOMweb import from a real Orthanc (Debian's 1.10 + DICOMweb plugin 1.7) against the same files from a folder.

For each cohort (full-field uncompressed Hologic-like images; a mixed-compression cohort at 1024 px):
the files are stored in a fresh Orthanc on loopback (tests/orthanc_server.py), then imported
1. from the folder, 2. over DICOMweb (QIDO-RS listing + WADO-RS retrieval + the same workers), and
3. again over DICOMweb (nothing new: the listing and the report only). Also the listing alone
(QIDO-RS, instances/s). Display long side 1024, ``--workers`` processes, ``--concurrency`` retrievals.

    nice .venv/bin/python benchmarks/bench_dicomweb.py [--full-field 16] [--mixed 12] [--workers 2]

Writes benchmarks/results/dicomweb.json (with the load average: the machine is shared).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from importers.dicomweb_source import DicomWebImport  # noqa: E402
from importers.run import import_dicoms  # noqa: E402
from importers.synthetic import write_synthetic_cohort  # noqa: E402
from mammoflag.dicom.types import NormalizeOptions  # noqa: E402
from mammoflag.dicomweb import DicomWebAuth, DicomWebClient, DicomWebQuery, DicomWebSource  # noqa: E402
from mammoflag.settings import Secret  # noqa: E402
from orthanc_server import OrthancServer  # noqa: E402


def timed_import(source, out: Path, workers: int) -> dict:
    started = time.perf_counter()
    summary = import_dicoms(source, out, NormalizeOptions(long_side=1024), "bench-secret", workers=workers,
                            progress=False)
    seconds = time.perf_counter() - started
    return {"instances": summary.files, "imported": summary.imported, "new_frames": summary.new_frames,
            "seconds": round(seconds, 2), "instances_per_second": round(summary.files / seconds, 2)}


def run_cohort(name: str, folder: Path, work: Path, workers: int, concurrency: int) -> dict:
    server = OrthancServer(work / f"orthanc-{name}").start()
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".csv")
        started = time.perf_counter()
        server.upload_folder(folder)
        upload_s = time.perf_counter() - started
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        source = DicomWebSource.parse(server.dicomweb_url)
        auth = DicomWebAuth(server.user, Secret("MAMMOFLAG_DICOMWEB_PASSWORD", "bench", server.password))
        client = DicomWebClient(source, auth, pool_size=concurrency + 2)
        started = time.perf_counter()
        listed = sum(1 for _ in client.iter_instances(DicomWebQuery()))
        list_s = time.perf_counter() - started
        remote = DicomWebImport(source, client, DicomWebQuery(), concurrency)
        result = {
            "instances": len(files), "mb": round(size_mb, 1), "upload_seconds": round(upload_s, 2),
            "listing": {"instances": listed, "seconds": round(list_s, 3),
                        "instances_per_second": round(listed / list_s, 1)},
            "folder": timed_import(folder, work / f"{name}-folder", workers),
            "dicomweb": timed_import(remote, work / f"{name}-web", workers),
            "dicomweb_rerun_nothing_new": timed_import(remote, work / f"{name}-web", workers),
        }
        result["dicomweb"]["mb_per_second"] = round(size_mb / result["dicomweb"]["seconds"], 1)
        return result
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-field", type=int, default=16, help="full-field uncompressed files")
    ap.add_argument("--mixed", type=int, default=12, help="studies of the mixed-compression 1024 px cohort")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    try:
        full = work / "full-field"
        write_synthetic_cohort(full, args.full_field, seed=1, size=None, images_per_study=(1, 1), vendors=["hologic"],
                               compressions=["none"], for_processing_every=0, multiframe=False)
        mixed = work / "mixed"
        write_synthetic_cohort(mixed, args.mixed, seed=2, size=1024)
        load_before = os.getloadavg()
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "orthanc": "Debian 1.10.1 + DICOMweb plugin 1.7, loopback, SQLite index, StorageCompression false",
            "workers": args.workers, "concurrency": args.concurrency,
            "full_field_uncompressed": run_cohort("full", full, work, args.workers, args.concurrency),
            "mixed_compression_1024px": run_cohort("mixed", mixed, work, args.workers, args.concurrency),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = REPO / "benchmarks" / "results" / "dicomweb.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
