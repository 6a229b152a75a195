"""pypdf's log messages ("EOF marker not found", ...) attributed to the PDF being read.

pypdf logs through ``logging`` without naming the file, so a bare "EOF marker not found" line in the middle
of an ingest says nothing useful. While :func:`collect_pypdf_notes` is active in a thread, pypdf's messages
from that thread are collected for the loader, which reports them as the file's warnings or failure reason.
Messages from anywhere else go on to the root logger's handlers unchanged.
"""

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

_active = threading.local()  # .notes: the list of the file this thread is reading


class _RouteToFile(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(_active, "notes", None)
        if notes is not None:
            notes.append(record.getMessage())
            return
        # Not inside a PDF load: behave as if the pypdf logger still propagated.
        root = logging.getLogger()
        for handler in root.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


@cache
def _install() -> None:
    logger = logging.getLogger("pypdf")
    logger.addHandler(_RouteToFile())
    logger.propagate = False


@contextmanager
def collect_pypdf_notes() -> Iterator[list[str]]:
    """Collect pypdf's log messages of this thread, in order, into the yielded list."""
    _install()
    notes: list[str] = []
    previous = getattr(_active, "notes", None)
    _active.notes = notes
    try:
        yield notes
    finally:
        _active.notes = previous
