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


# -- downloads -----------------------------------------------------------------------------------

# torchvision's convention (torch.hub.HASH_REGEX): a weights file is named <name>-<first hex digits of its
# SHA-256>.<ext>, e.g. resnet18-f37072fd.pth, so the name alone says what the bytes must hash to.
_HASH_IN_NAME = r"-([a-f0-9]{8,64})\."


def sha256_prefix_of(name: str) -> str | None:
    """The SHA-256 prefix a torchvision-style file name carries, or None when it carries none."""
    import re

    found = re.search(_HASH_IN_NAME, name)
    return found.group(1) if found else None


def download_checked(url: str, dest: str | Path, timeout_s: float = 10.0, chunk: int = 1 << 20) -> Path:
    """Fetch ``url`` into ``dest`` as torchvision does, but with a timeout and nothing half-written.

    The bytes stream to a temporary name beside ``dest`` and become ``dest`` only when their SHA-256
    starts with the prefix in the URL's file name (``sha256_prefix_of``); a URL whose name carries no
    prefix is refused, as is a mismatch (ValueError naming the URL and both hashes). Network errors
    (unreachable, refused, timed out, HTTP errors) propagate as OSError."""
    import hashlib
    import urllib.request
    from urllib.parse import urlparse

    name = Path(urlparse(url).path).name
    expected = sha256_prefix_of(name)
    if expected is None:
        raise ValueError(f"{url}: the file name carries no SHA-256 prefix (<name>-<hash>.<ext>) to check it by")
    if urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"{url}: only http(s) downloads are made")
    final = Path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(final) as tmp:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "xb") as fh:
            while block := response.read(chunk):
                digest.update(block)
                fh.write(block)
        if not digest.hexdigest().startswith(expected):
            raise ValueError(f"{url}: SHA-256 {digest.hexdigest()[:16]}... does not start with {expected} "
                             "(the prefix its name promises); not kept")
    return final
