"""File plumbing written once: atomic writes, private modes, spreadsheet-safe CSV cells.

Every file a reader may see while a writer runs (a PNG, a report, a registry pointer, a
shard result) is written under a temporary name beside its final one and moved into place
with ``os.replace``: a file under its final name is always complete. A process killed
mid-write leaves only ``<name>.<token>.partial``, which :func:`sweep_partials` removes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

PARTIAL_SUFFIX = ".partial"
# OWASP's rule for CSV injection: a cell a spreadsheet would read as a formula starts with one of these.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def partial_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder, so os.replace stays atomic)."""
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically, on error it is removed."""
    final = Path(path)
    tmp = partial_path(final)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | Path, data: str | bytes, mode: int | None = None) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` so that readers see the old file or the whole new one.

    With ``mode`` the file is created with it (0600 for secrets: never readable by others, not
    even for the moment between create and chmod).
    """
    with atomic_path(path, mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_json(path: str | Path, obj: Any, mode: int | None = None) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def atomic_write_lines(path: str | Path, rows: Iterable[Any], mode: int | None = None) -> None:
    """JSON lines, one object per line."""
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), mode)


def sweep_partials(folder: str | Path, recursive: bool = True) -> int:
    """Remove ``*.<token>.partial`` files a killed writer left behind; return how many."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    found = root.rglob(f"*{PARTIAL_SUFFIX}") if recursive else root.glob(f"*{PARTIAL_SUFFIX}")
    removed = 0
    for p in found:
        with contextlib.suppress(OSError):
            if p.is_file():
                p.unlink()
                removed += 1
    return removed


# -- CSV -----------------------------------------------------------------------------------------

def safe_cell(value: Any) -> Any:
    """A CSV cell no spreadsheet runs as a formula: text starting ``= + - @ TAB CR`` gets a leading quote.

    Numbers are left alone (a negative number is a number, not a formula); only text is escaped.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def safe_row(row: Sequence[Any]) -> list[Any]:
    return [safe_cell(v) for v in row]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A whole CSV document with every cell neutralised."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(safe_row(header))
    for r in rows:
        w.writerow(safe_row(r))
    return buf.getvalue()
