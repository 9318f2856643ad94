"""The import run: a folder of DICOM files in, display PNGs, a manifest, tasks and a report out.

:func:`import_dicoms` is the pure core behind ``mammoflag import``. It walks the DICOM
folder recursively (every file, whatever its name), normalizes each file in worker
processes with :func:`mammoflag.dicom.normalize.load_display_frames`, and streams what comes back
into ``DATA_DIR`` (see docs/CONTRACTS.md "Import DATA_DIR"):

- ``images/<sop_instance_uid>/<frame>.png``: written by the workers under a temporary
  name and moved into place by the parent once it has decided the file is imported;
- ``manifest.csv``: one row per imported frame, appended and flushed as files finish;
- ``import_report.csv``: exactly one row per input file, in walk order;
- ``tasks.json``: the Label Studio task list, written from the manifest at the end.

Nothing is held per file in Python: the keys already in the manifest, the SOP Instance UIDs
claimed by this run and the earlier report rows live in a scratch SQLite file,
``DATA_DIR/.import-state.sqlite`` (:class:`_ImportState`), rebuilt from manifest.csv and the
report files at the start of every run and removed at its end, so memory stays flat over a
million files. Re-running into the same DATA_DIR resumes: files the last report lists as
imported whose PNGs and manifest rows exist are not read again, and no manifest row is ever
written twice.
Report reasons and log lines never carry patient identifiers or file paths.

Files are decoded in *spawned* worker processes (:func:`mammoflag.pool.isolated_map`), one or
more, never in the parent: a decoder that aborts or is killed for memory fails only its own
file, and the workers die with the parent. A script that calls ``import_dicoms`` must guard its
top level with ``if __name__ == "__main__":`` (the console script and tests do). Before anything
is decoded the header's image size is checked against the caps in ``NormalizeOptions``, which
bounds a worker's memory (README, "Hostile input").

Every CSV cell is spreadsheet-safe (:func:`mammoflag.fileio.safe_cell`): a file named
``=HYPERLINK(...).dcm`` is reported as ``'=HYPERLINK(...).dcm``. A re-run first removes the
``*.partial`` files a killed run left behind.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sqlite3
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from mammoflag.dicom.types import ImportProblem, ImportStatus, NormalizeOptions
from mammoflag.datadir import (
    IMAGES_DIR,
    INT_COLUMNS,
    LIST_COLUMNS,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    REPORT_COLUMNS,
    REPORT_FILE,
    TASKS_FILE,
    HeaderHints,
    image_key,
    is_valid_uid,
    manifest_fieldnames,
    read_manifest,
)
from mammoflag.dicomweb import DicomWebError
from mammoflag.fileio import PARTIAL_SUFFIX, atomic_path, safe_cell, sweep_partials
from mammoflag.paths import task_url_for
from importers.png import encode_png
from mammoflag.pool import isolated_map

if TYPE_CHECKING:
    import numpy as np

    from importers.dicomweb_source import DicomWebImport

log = logging.getLogger(__name__)

__all__ = ["import_dicoms", "iter_tasks", "read_manifest", "ImportRunError", "ImportSummary", "MANIFEST_FILE",
           "MANIFEST_COLUMNS", "REPORT_COLUMNS", "REPORT_FILE", "TASKS_FILE", "IMAGES_DIR"]

STATE_FILE = ".import-state.sqlite"  # scratch state of a run going on (see _ImportState)
STATE_COMMIT_EVERY = 500  # writes to the state between commits
# The display PNG is encoded by importers/png.py: SUB-filtered rows, ISA-L deflate level 1 (OpenCV when the
# isal wheel is absent). The same pixels, ~2 ms for a 1024 x 832 display (benchmarks/bench_png.py).


class ImportRunError(RuntimeError):
    """The run could not start or finish (missing input folder, unwritable output ...)."""


@dataclass
class ImportSummary:
    files: int = 0  # input files seen (= report rows)
    imported: int = 0  # files imported (including resumed ones)
    resumed: int = 0  # of those, files already imported by an earlier run and not read again
    skipped: int = 0
    failed: int = 0
    duplicates: int = 0  # of the skipped, files repeating an already imported SOP Instance UID
    new_frames: int = 0  # manifest rows written by this run
    tasks: int = 0  # tasks in tasks.json (all frames imported into DATA_DIR so far)
    seconds: float = 0.0
    out_dir: Path | None = None
    report_path: Path | None = None
    manifest_path: Path | None = None
    tasks_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    unit: str = "files"  # "instances" for a DICOMweb source

    def count(self, status: ImportStatus) -> None:
        """One more file with this outcome."""
        if status is ImportStatus.IMPORTED:
            self.imported += 1
        elif status is ImportStatus.SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1

    def as_text(self) -> str:
        lines = [
            f"{self.files} {self.unit}: {self.imported} imported ({self.resumed} already imported earlier), "
            f"{self.skipped} skipped ({self.duplicates} duplicate SOP Instance UIDs), {self.failed} failed "
            f"in {self.seconds:.1f} s",
            f"{self.new_frames} new frames; {self.tasks} tasks in {self.tasks_path}",
            f"report: {self.report_path}",
        ]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


# --------------------------------------------------------------------------------------------
# Worker side: one file -> PNGs under temporary names + small facts (no pixels travel back)


@dataclass(frozen=True)
class _Job:
    path: str  # absolute path of the input file
    rel: str  # path relative to the DICOM folder, as the report shows it
    images_dir: str
    options: NormalizeOptions
    patient_key_secret: str = field(repr=False)
    known: tuple[str, str] = ("", "")  # (SOP, Study Instance UID) a DICOMweb listing named; report cells on failure
    problem: str = ""  # a folder that cannot be listed: fails as it is, in walk order


@dataclass
class _Outcome:
    rel: str
    status: ImportStatus
    reason: str = ""
    hints: HeaderHints | None = None
    frames: list[tuple[int, str]] = field(default_factory=list)  # (frame number, temporary PNG path)
    notes: list[str] = field(default_factory=list)


def _convert_file(job: _Job) -> _Outcome:
    """Normalize one file and write its display PNGs under temporary names (runs in a worker)."""
    from mammoflag.dicom.normalize import load_display_frames

    if job.problem:
        return _Outcome(job.rel, ImportStatus.FAILED, job.problem)
    try:
        images = load_display_frames(Path(job.path), job.options, job.patient_key_secret)
    except ImportProblem as problem:
        return _Outcome(job.rel, problem.status, problem.reason)
    except MemoryError:
        return _Outcome(job.rel, ImportStatus.FAILED, "out of memory while decoding the pixel data")
    except Exception as exc:  # a bug or a decoder surprise: report it without its message (may quote values)
        return _Outcome(job.rel, ImportStatus.FAILED, _unexpected_error(exc))
    sop = images.hints.sop_instance_uid
    if not is_valid_uid(sop):  # load_display_frames checks it; the folder name depends on it
        return _Outcome(job.rel, ImportStatus.FAILED, "SOP Instance UID (0008,0018) is missing or not a valid UID")
    if not images.frames:
        return _Outcome(job.rel, ImportStatus.FAILED, "no frames could be decoded from Pixel Data (7FE0,0010)")

    folder = Path(job.images_dir) / sop
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    written: list[tuple[int, str]] = []
    try:
        for frame in images.frames:
            tmp = folder / f"{frame.frame}.png.{token}{PARTIAL_SUFFIX}"
            _write_png(tmp, frame.pixels)
            written.append((frame.frame, str(tmp)))
    except OSError as exc:
        _discard(written)
        return _Outcome(job.rel, ImportStatus.FAILED,
                        f"could not write the display PNG ({exc.strerror or type(exc).__name__})")
    return _Outcome(job.rel, ImportStatus.IMPORTED, "", images.hints, written, list(images.notes))


def _write_png(path: Path, pixels: "np.ndarray") -> None:
    with open(path, "wb") as fh:
        fh.write(encode_png(pixels))


def _crashed(job: _Job) -> _Outcome:
    """The outcome of a file whose decoding killed its worker process twice (a native decoder crash)."""
    return _Outcome(job.rel, ImportStatus.FAILED, "the decoder crashed on this file (worker process died)")


def _unexpected_error(exc: BaseException) -> str:
    """'unexpected ValueError in module.py:123': where it broke, not what the message (maybe a value) said."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"unexpected {type(exc).__name__}{where} while reading the file"


def _discard(written: list[tuple[int, str]]) -> None:
    for _, tmp in written:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# Parent side


@dataclass(frozen=True)
class UnreadableFolder:
    """A folder below the DICOM folder that cannot be listed: one report row (its files are unknown)."""

    path: Path
    reason: str


def walk_files(dicom_dir: Path, exclude: Path | None = None) -> Iterator[Path | UnreadableFolder]:
    """Every regular file below ``dicom_dir``, depth first, sorted by name; directory links are not followed.

    A folder that cannot be listed (permissions, I/O error) comes out as an :class:`UnreadableFolder`
    in its place, so the report accounts for it.
    """
    exclude = exclude.resolve() if exclude else None
    stack = [dicom_dir]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield UnreadableFolder(folder, f"folder cannot be listed ({type(exc).__name__}): its files were not "
                                           "imported")
            continue
        subfolders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if exclude is None or Path(entry.path).resolve() != exclude:
                    subfolders.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)
        stack.extend(reversed(subfolders))


def import_dicoms(
    dicom_dir: "str | Path | DicomWebImport",
    out_dir: str | Path,
    options: NormalizeOptions,
    patient_key_secret: str,
    data_root: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    job_runner: "Callable[[Iterator[_Job]], Iterable[tuple[_Job, _Outcome]]] | None" = None,
) -> ImportSummary:
    """Import every file below ``dicom_dir`` into ``out_dir``; returns counts and where things are.

    ``patient_key_secret`` keys the patient hash; ``data_root`` is Label Studio's local-files
    root (task image URLs are relative to it; when ``out_dir`` lies outside it they are made
    relative to ``out_dir`` and a warning says so). ``workers`` > 1 normalizes in that many
    processes. Raises ImportRunError only when the run cannot happen at all.

    ``dicom_dir`` may instead be a :class:`importers.dicomweb_source.DicomWebImport`: the instances a
    DICOMweb service lists, retrieved and imported the same way (report rows keyed by SOP Instance UID).
    """
    from importers.dicomweb_source import DicomWebImport, clear_retrieved

    started = time.monotonic()
    remote = dicom_dir if isinstance(dicom_dir, DicomWebImport) else None
    out_dir = Path(out_dir).resolve()
    if remote is None:
        dicom_dir = Path(dicom_dir).resolve()  # type: ignore[arg-type]
        if not dicom_dir.is_dir():
            raise ImportRunError(f"DICOM folder {dicom_dir} does not exist or is not a folder")
    try:
        (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImportRunError(f"cannot create the output folder {out_dir}: {exc.strerror}") from exc
    summary = ImportSummary(out_dir=out_dir, report_path=out_dir / REPORT_FILE,
                            manifest_path=out_dir / MANIFEST_FILE, tasks_path=out_dir / TASKS_FILE)
    url_root = _url_root(out_dir, data_root, summary)
    _sweep_leftovers(out_dir)
    if remote is not None:
        summary.unit = "instances"
        clear_retrieved(out_dir)

    try:
        store = _ImportState.rebuild(out_dir, key_column="sop_instance_uid" if remote else "path")
    except (sqlite3.Error, OSError) as exc:  # a full disk, a read-only DATA_DIR ...
        raise ImportRunError(f"cannot write the import state in {out_dir} ({_why(exc)})") from None
    bar = None
    partial_report = out_dir / (REPORT_FILE + PARTIAL_SUFFIX)
    try:
        state = _RunState(out_dir, store, summary)
        bar = _progress_bar(dicom_dir, out_dir, progress) if remote is None else _remote_progress_bar(progress)
        with open(partial_report, "w", newline="", encoding="utf-8") as report_fh, \
                open(out_dir / MANIFEST_FILE, "a", newline="", encoding="utf-8") as manifest_fh:
            state.report = csv.DictWriter(report_fh, fieldnames=REPORT_COLUMNS)
            state.report.writeheader()
            state.manifest = csv.DictWriter(manifest_fh, fieldnames=manifest_fieldnames(out_dir / MANIFEST_FILE),
                                            extrasaction="ignore")
            state.report_fh, state.manifest_fh, state.bar = report_fh, manifest_fh, bar
            if remote is None:
                _run_jobs(_jobs(dicom_dir, out_dir, options, patient_key_secret, state), workers, state,
                          runner=job_runner)  # job_runner: importers/distributed.py (Celery shards)
            else:
                _run_remote(remote, out_dir, options, patient_key_secret, workers, state)
    except DicomWebError as exc:
        raise ImportRunError(f"{exc} (what was imported is kept)") from None
    except (sqlite3.Error, OSError) as exc:
        raise ImportRunError(f"cannot write to {out_dir} ({_why(exc)}); run the same command again to resume") \
            from None
    finally:
        if bar is not None:
            bar.close()
        store.close(remove=True)
        if remote is not None:
            clear_retrieved(out_dir)
    os.replace(partial_report, out_dir / REPORT_FILE)
    summary.tasks = write_tasks_json(out_dir, url_root)
    summary.seconds = time.monotonic() - started
    log.info("import finished: %s imported, %s skipped, %s failed, %s new frames", summary.imported,
             summary.skipped, summary.failed, summary.new_frames)
    return summary


def _why(exc: BaseException) -> str:
    """An OS or SQLite error in words, without the path it names."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    text = str(exc)
    return text if "disk" in text or "readonly" in text or "locked" in text else type(exc).__name__


def _sweep_leftovers(out_dir: Path) -> None:
    """Remove what a killed run left half-written: PNGs under temporary names, a tasks.json being written.

    (``import_report.csv.partial`` stays: it is the interrupted run's report, read back to resume.)
    """
    removed = sweep_partials(out_dir / IMAGES_DIR)
    for leftover in out_dir.glob(f"{TASKS_FILE}.*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d half-written file(s) an interrupted run left in the output folder", removed)


def _url_root(out_dir: Path, data_root: str | Path | None, summary: ImportSummary) -> Path:
    if data_root is not None and out_dir.is_relative_to(Path(data_root).resolve()):
        return Path(data_root).resolve()
    summary.warnings.append("the output folder is not inside the data root: task image URLs are relative to "
                            "the output folder (serve it as Label Studio's LOCAL_FILES_DOCUMENT_ROOT)")
    return out_dir


def _progress_bar(dicom_dir: Path, out_dir: Path, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum(1 for _ in walk_files(dicom_dir, exclude=out_dir))  # a cheap first pass gives an ETA
    return tqdm(total=total, unit="file", desc="import", dynamic_ncols=True, smoothing=0.05)


class _ImportState:
    """The parent's per-file memory, on disk: manifest keys, SOPs claimed this run, earlier report rows.

    A scratch SQLite file in DATA_DIR (``STATE_FILE``), never a source of truth: :meth:`rebuild`
    derives it afresh from manifest.csv and the report files at the start of each run, and the run
    removes it when it ends. Writes are committed in batches; reads on the same connection see them
    at once, so batching changes nothing but speed.
    """

    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")  # a crash mid-run only loses scratch state: rebuilt next run
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(
            "CREATE TABLE manifest_keys (key TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE claimed_sops (sop TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE previous_rows (path TEXT PRIMARY KEY, row TEXT NOT NULL) WITHOUT ROWID;")
        self._pending = 0
        self._db.execute("BEGIN")

    @classmethod
    def rebuild(cls, out_dir: Path, key_column: str = "path") -> "_ImportState":
        """A fresh state for a run into ``out_dir``: the repaired manifest's keys and the earlier imports
        (found again by ``key_column``: the file's path, or a DICOMweb instance's SOP Instance UID)."""
        _remove_state_files(out_dir / STATE_FILE)  # left by an interrupted run: never trusted
        store = cls(out_dir / STATE_FILE)
        try:
            for row in _previous_imports(out_dir):
                store.set_previous_row(row, key_column)
            for key in _repair_manifest(out_dir / MANIFEST_FILE):
                store.add_key(key)
            store.commit()
        except BaseException:
            store.close(remove=True)
            raise
        return store

    def _wrote(self) -> None:
        self._pending += 1
        if self._pending >= STATE_COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._pending = 0

    def has_key(self, key: str) -> bool:
        """Whether manifest.csv has a row for ``key`` (``<sop_instance_uid>:<frame>``)."""
        return self._db.execute("SELECT 1 FROM manifest_keys WHERE key = ?", (key,)).fetchone() is not None

    def add_key(self, key: str) -> bool:
        """Note a manifest key; False when it was there already."""
        added = self._db.execute("INSERT OR IGNORE INTO manifest_keys VALUES (?)", (key,)).rowcount == 1
        self._wrote()
        return added

    def is_claimed(self, sop: str) -> bool:
        """Whether some file of this run was already imported (or resumed) as this SOP Instance UID."""
        return self._db.execute("SELECT 1 FROM claimed_sops WHERE sop = ?", (sop,)).fetchone() is not None

    def claim_sop(self, sop: str) -> bool:
        """Claim a SOP Instance UID for the file at hand; False when another file of this run holds it."""
        claimed = self._db.execute("INSERT OR IGNORE INTO claimed_sops VALUES (?)", (sop,)).rowcount == 1
        self._wrote()
        return claimed

    def set_previous_row(self, row: dict[str, str], key_column: str = "path") -> None:
        """Remember an earlier run's report row for its path (a later one replaces an earlier one)."""
        self._db.execute("INSERT OR REPLACE INTO previous_rows VALUES (?, ?)", (row[key_column], json.dumps(row)))
        self._wrote()

    def previous_row(self, path: str) -> dict[str, str] | None:
        """The report row an earlier run wrote for ``path`` when it imported that file, else None."""
        found = self._db.execute("SELECT row FROM previous_rows WHERE path = ?", (path,)).fetchone()
        return None if found is None else json.loads(found[0])

    def close(self, remove: bool = False) -> None:
        try:
            if not remove:
                self._db.execute("COMMIT")
            self._db.close()
        finally:
            if remove:
                _remove_state_files(self.path)


def _remove_state_files(path: Path) -> None:
    for name in (path.name, path.name + "-journal", path.name + "-wal", path.name + "-shm"):
        try:
            os.unlink(path.with_name(name))
        except FileNotFoundError:
            pass


class _RunState:
    """What the parent keeps while files stream through: open writers, counters, the state store."""

    def __init__(self, out_dir: Path, store: _ImportState, summary: ImportSummary):
        self.out_dir = out_dir
        self.store = store  # manifest keys, SOPs claimed this run, earlier report rows
        self.summary = summary
        self.report: csv.DictWriter | None = None
        self.manifest: csv.DictWriter | None = None
        self.report_fh = self.manifest_fh = None
        self.bar = None

    def record(self, row: dict[str, Any]) -> None:
        """One report row per input file; counters and progress follow it. Every cell is spreadsheet-safe."""
        self.report.writerow({c: safe_cell(row.get(c, "")) for c in REPORT_COLUMNS})
        self.report_fh.flush()
        self.summary.files += 1
        status = ImportStatus(row["status"])
        self.summary.count(status)
        if status is not ImportStatus.IMPORTED:
            log.debug("input file #%d %s: %s", self.summary.files, status, row.get("reason", ""))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(imported=self.summary.imported, skipped=self.summary.skipped,
                                 failed=self.summary.failed, refresh=False)

    def finish(self, outcome: _Outcome, known: tuple[str, str] = ("", "")) -> None:
        """Decide what a worker's outcome becomes: imported, a duplicate, or a report row only."""
        if outcome.status is not ImportStatus.IMPORTED:
            self.record({"path": outcome.rel, "status": outcome.status, "reason": outcome.reason, "frames": 0,
                         "sop_instance_uid": known[0], "study_instance_uid": known[1]})
            return
        hints = outcome.hints
        sop = hints.sop_instance_uid
        base = {"path": outcome.rel, "sop_instance_uid": sop,
                "study_instance_uid": hints.study_instance_uid, "notes": "|".join(outcome.notes)}
        if not self.store.claim_sop(sop):  # imported from another file in this run
            _discard(outcome.frames)
            self.summary.duplicates += 1
            self.record({**base, "status": ImportStatus.SKIPPED, "frames": 0,
                         "reason": "duplicate SOP Instance UID (0008,0018): already imported from another file"})
            return
        for frame, tmp in outcome.frames:
            image = Path(IMAGES_DIR) / sop / f"{frame}.png"
            os.replace(tmp, self.out_dir / image)  # atomic: a PNG under its final name is complete
            if self.store.add_key(image_key(sop, frame)):  # a frame the manifest lacks
                self.manifest.writerow(hints.manifest_row(frame, image))
                self.summary.new_frames += 1
        self.manifest_fh.flush()
        self.record({**base, "status": ImportStatus.IMPORTED, "frames": len(outcome.frames)})

    def resume(self, rel: str, previous: dict[str, str]) -> bool:
        """Report a file an earlier run imported, without reading it again, when its outputs are all there."""
        sop, frames = previous["sop_instance_uid"], int(previous.get("frames") or 0)
        if frames < 1 or not is_valid_uid(sop) or self.store.is_claimed(sop):
            return False
        for frame in range(frames):
            if not self.store.has_key(image_key(sop, frame)) or \
                    not (self.out_dir / IMAGES_DIR / sop / f"{frame}.png").is_file():
                return False
        self.store.claim_sop(sop)
        self.summary.resumed += 1
        notes = [n for n in previous.get("notes", "").split("|") if n and n != "resumed"] + ["resumed"]
        self.record({**previous, "path": rel, "status": ImportStatus.IMPORTED, "reason": "",
                     "notes": "|".join(notes)})
        return True


def _jobs(dicom_dir: Path, out_dir: Path, options: NormalizeOptions, secret: str,
          state: _RunState) -> Iterator[_Job]:
    images_dir = str(out_dir / IMAGES_DIR)
    for path in walk_files(dicom_dir, exclude=out_dir):
        if isinstance(path, UnreadableFolder):
            yield _Job(str(path.path), path.path.relative_to(dicom_dir).as_posix() + "/", images_dir, options, secret,
                       problem=path.reason)
            continue
        rel = path.relative_to(dicom_dir).as_posix()
        earlier = state.store.previous_row(safe_cell(rel))  # the report holds paths as safe cells
        if earlier is not None and state.resume(rel, earlier):
            continue
        yield _Job(str(path), rel, images_dir, options, secret)


def _run_jobs(jobs: Iterator[_Job], workers: int, state: _RunState,
              after: Callable[[_Job], None] | None = None,
              runner: "Callable[[Iterator[_Job]], Iterable[tuple[_Job, _Outcome]]] | None" = None) -> None:
    """Normalize files in worker processes (at least one: a decoder crash never takes the run down), in order.

    At most 4 files per worker are in flight: enough to keep every worker busy, bounded so memory
    stays flat. A worker that dies (a decoder segfault, an abort on a failed allocation) breaks the
    pool: the files in flight are retried one at a time in fresh processes, so only the culprit fails.
    """
    results = runner(jobs) if runner is not None else isolated_map(
        _convert_file, jobs, workers=max(1, workers), crashed=_crashed, window=max(1, workers) * 4, ordered=True,
        initializer=_worker_setup)
    for job, outcome in results:
        state.finish(outcome, job.known)
        if after is not None:
            after(job)  # a DICOMweb instance's temporary file: removed or kept


def _run_remote(remote: "DicomWebImport", out_dir: Path, options: NormalizeOptions, secret: str, workers: int,
                state: _RunState) -> None:
    """A DICOMweb source through the same workers: listed, retrieved to temporary files, imported, released."""
    from importers.dicomweb_source import dicomweb_jobs, release

    images_dir = str(out_dir / IMAGES_DIR)
    stopped: list[DicomWebError] = []
    jobs = dicomweb_jobs(remote, out_dir, state,
                         lambda path, rel, known: _Job(path, rel, images_dir, options, secret, known), stopped)
    _run_jobs(jobs, workers, state, after=lambda job: release(remote, job.path, job.rel))
    if stopped:  # raised once the instances already retrieved are imported
        raise stopped[0]
    if remote.client.invalid_uids:
        state.summary.warnings.append(f"{remote.client.invalid_uids} listed studies or instances were left out: "
                                      "their UIDs are not valid UIDs")


def _remote_progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # a DICOMweb listing is streamed: no total (counting would mean listing the archive twice)
    return tqdm(unit="instance", desc="import", dynamic_ncols=True, smoothing=0.05)


def _worker_setup() -> None:
    from mammoflag.dicom.normalize import quiet_pydicom

    quiet_pydicom()


# --------------------------------------------------------------------------------------------
# Files in DATA_DIR


def _repair_manifest(path: Path) -> Iterator[str]:
    """The keys already in manifest.csv, streamed, once each; first creates it with a header, or cuts a
    half-written last line."""
    if not path.exists() or path.stat().st_size == 0:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS).writeheader()
        return iter(())
    with open(path, "rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.seek(end - 1)
        if fh.read(1) != b"\n":  # an interrupted run left a partial row: cut back to the last full line
            start = end
            while start > 0:
                start = max(0, start - 65536)
                fh.seek(start)
                newline = fh.read(end - start).rfind(b"\n")
                if newline >= 0:
                    fh.truncate(start + newline + 1)
                    break
            else:
                fh.truncate(0)
    if path.stat().st_size == 0:
        return _repair_manifest(path)  # not even the header survived
    return (row["key"] for row in read_manifest(path))


def _previous_imports(out_dir: Path) -> Iterator[dict[str, str]]:
    """Report rows of files earlier runs imported, streamed: the last report, then an interrupted run's
    partial one (a later row for the same path wins)."""
    for name in (REPORT_FILE, REPORT_FILE + PARTIAL_SUFFIX):
        path = out_dir / name
        if not path.exists():
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("status") == "imported" and row.get("sop_instance_uid") and row.get("path"):
                    yield row


def task_data(row: dict[str, str], out_dir: Path, url_root: Path) -> dict[str, Any]:
    """A Label Studio task's ``data`` for one manifest row (docs/CONTRACTS.md "Task data keys")."""
    data: dict[str, Any] = {}
    for column in MANIFEST_COLUMNS:
        value: Any = row.get(column, "")
        if column in LIST_COLUMNS:
            value = [v for v in value.split("|") if v]
        elif column in INT_COLUMNS:
            value = int(value) if str(value).strip() else None
        data[column] = value
    data["image"] = task_url_for(out_dir / row["image"], url_root)
    data["study_label"] = study_label(row.get("study_instance_uid", ""))
    return data


def study_label(study_uid: str) -> str:
    """A short, stable name for a study in the annotator's header (a hash: the UID itself is long)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:8] if study_uid else ""


def write_tasks_json(out_dir: Path, url_root: Path) -> int:
    """tasks.json from manifest.csv, streamed (one task per line inside one JSON array); returns the count."""
    count = 0
    with atomic_path(out_dir / TASKS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write("[")
        for row in read_manifest(out_dir / MANIFEST_FILE):
            fh.write(",\n" if count else "\n")
            fh.write(json.dumps({"data": task_data(row, out_dir, url_root)}, ensure_ascii=False))
            count += 1
        fh.write("\n]\n")
    return count


def iter_tasks(out_dir: Path, url_root: Path) -> Iterator[dict[str, Any]]:
    """The tasks of an import DATA_DIR, streamed from its manifest (what tasks.json holds)."""
    for row in read_manifest(Path(out_dir) / MANIFEST_FILE):
        yield {"data": task_data(row, Path(out_dir), url_root)}
