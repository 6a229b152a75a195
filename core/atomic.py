"""Crash-safe file writes shared by every package: a reader sees the old file or the new one, never a torn one."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: str | Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without an exception.

    The data goes to a temporary file in the same directory (so the rename cannot cross file systems),
    is fsynced, renamed over ``path``, and the directory is fsynced so the rename survives a power cut.
    ``mode`` sets the file's permissions before it becomes visible.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_path(path.parent)


def write_atomically(path: str | Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) in one crash-safe step."""
    with atomic_writer(path, mode=mode) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory's entries (making a rename or unlink in it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
