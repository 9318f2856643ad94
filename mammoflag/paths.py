"""Task image URLs <-> files under the data root, with no way out of the data root.

Label Studio serves local files as ``/data/local-files/?d=<path relative to LOCAL_FILES_DOCUMENT_ROOT>``.
mammoflag points that root at the data root, so the same relative path names the file for
Label Studio, training, the ML backend and the flagger.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, quote, urlsplit

LOCAL_FILES_PREFIX = "/data/local-files/"


class UnsafeImagePath(ValueError):
    """A task image URL that is not a local file below the data root."""


def task_url_for(image: Path, data_root: Path) -> str:
    """The Label Studio URL of a file below the data root."""
    rel = Path(image).resolve().relative_to(Path(data_root).resolve())
    return f"{LOCAL_FILES_PREFIX}?d={quote(rel.as_posix(), safe='/')}"


def resolve_task_image(url: str, data_root: Path) -> Path:
    """The file a task image URL names; UnsafeImagePath unless it lies below the data root.

    Only ``/data/local-files/?d=...`` URLs (optionally with Label Studio's own host) are
    accepted: the backend never fetches arbitrary URLs.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("", "http", "https") or not parts.path.endswith(LOCAL_FILES_PREFIX.rstrip("/")) and \
            not parts.path.endswith(LOCAL_FILES_PREFIX):
        raise UnsafeImagePath(f"image URL {url!r} is not a Label Studio local-files URL")
    values = parse_qs(parts.query).get("d")
    if not values or not values[0]:
        raise UnsafeImagePath(f"image URL {url!r} has no d= path")
    rel = PurePosixPath(values[0])
    if rel.is_absolute() or ".." in rel.parts:
        raise UnsafeImagePath(f"image URL {url!r} points outside the data root")
    root = Path(data_root).resolve()
    path = (root / rel).resolve()  # resolves symlinks too: a link out of the root is refused
    if not path.is_relative_to(root):
        raise UnsafeImagePath(f"image URL {url!r} points outside the data root")
    return path
