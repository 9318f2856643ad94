"""The importer's DICOMweb source: instances listed by QIDO-RS, retrieved by WADO-RS, imported like files.

``mammoflag import dicomweb+http(s)://HOST/PATH --out DATA_DIR`` hands :func:`importers.run.import_dicoms`
a :class:`DicomWebImport` instead of a folder. This module turns it into the same per-file jobs the
folder walk makes: each listed instance not imported before is retrieved (byte for byte, by a
bounded pool of threads, :func:`mammoflag.dicomweb.retrieve_ordered`) into a temporary file under
``DATA_DIR/.dicomweb-retrieved/``, which the import's worker processes normalise exactly as a file
from a folder (same display chain, hints, privacy rules, duplicate rule), and is removed once its
outcome is recorded (or moved to ``--keep-dicom DIR/<study>/<series>/<sop>.dcm``).

The report has one row per listed instance; its ``path`` is the instance's WADO-RS path below the
service root (``studies/<uid>/series/<uid>/instances/<uid>``) and earlier rows are found again by
SOP Instance UID, so a re-run (a nightly one over a growing archive, or one resuming an interrupted
run) retrieves only instances it has not imported yet.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mammoflag.dicom.types import ImportStatus
from mammoflag.dicomweb import (
    DicomWebClient,
    DicomWebError,
    DicomWebQuery,
    DicomWebSource,
    InstanceRef,
    keep_or_remove,
    retrieve_ordered,
)

RETRIEVED_DIR = ".dicomweb-retrieved"  # temporary copies of retrieved instances, inside DATA_DIR
DEFAULT_CONCURRENCY = 4

J = TypeVar("J")


@dataclass(frozen=True, eq=False)
class DicomWebImport:
    """What to import from a DICOMweb service, and how."""

    source: DicomWebSource
    client: DicomWebClient
    query: DicomWebQuery = DicomWebQuery()
    concurrency: int = DEFAULT_CONCURRENCY  # WADO-RS retrievals in flight
    keep_dicom: Path | None = None  # keep the retrieved files here (default: removed after import)

    def __str__(self) -> str:
        return str(self.source)


def clear_retrieved(out_dir: Path) -> None:
    """Remove the temporary instances a run (maybe a killed one) left in DATA_DIR."""
    shutil.rmtree(out_dir / RETRIEVED_DIR, ignore_errors=True)


def dicomweb_jobs(source: DicomWebImport, out_dir: Path, state: Any,
                  make_job: Callable[[str, str, tuple[str, str]], J], stopped: list[DicomWebError]) -> Iterator[J]:
    """The import jobs of every listed instance not imported before, each with its retrieved file.

    ``state`` is the run's state (``store.previous_row``, ``resume``, ``record``); ``make_job(path,
    rel, (sop, study))`` builds the worker's job. An instance that cannot be retrieved (404 ...) gets
    a failed report row. A server that refuses or stops answering ends the jobs early with the error
    put in ``stopped``, so the instances already retrieved are still imported before the run stops.
    """

    def new_refs() -> Iterator[InstanceRef]:
        for ref in source.client.iter_instances(source.query):
            previous = state.store.previous_row(ref.sop_uid)
            if previous is not None and state.resume(ref.path, previous):
                continue
            yield ref

    retrieved = retrieve_ordered(source.client, new_refs(), lambda r: r, out_dir / RETRIEVED_DIR,
                                 concurrency=source.concurrency)
    try:
        for ref, got in retrieved:
            if got.path is None:
                state.record({"path": ref.path, "status": ImportStatus.FAILED,
                              "reason": str(got.problem or "not retrieved"), "sop_instance_uid": ref.sop_uid,
                              "study_instance_uid": ref.study_uid, "frames": 0})
                continue
            yield make_job(str(got.path), ref.path, (ref.sop_uid, ref.study_uid))
    except DicomWebError as exc:  # access refused, or the server stopped answering: no more jobs
        stopped.append(exc)


def release(source: DicomWebImport, path: str, rel: str) -> None:
    """A retrieved instance whose outcome is recorded: removed, or kept under ``--keep-dicom``."""
    try:
        ref: InstanceRef | None = InstanceRef.from_path(rel)
    except ValueError:
        ref = None
    keep_or_remove(Path(path), ref, source.keep_dicom)
