"""A tenant's documents from the browser: uploads saved under the tenant's uploads dir and ingested, removal of a
document (with its uploaded original), and the original file of an indexed document (only the tenant's own
records; NotFound for anyone else's).

Ingest runs in a worker thread with its own embedder (the retrieval embedder's tokenizer serves queries
concurrently and must not be shared), one upload batch at a time.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from core.datadir import PRIVATE_FILE_MODE, make_private_dir, uploads_dir
from core.errors import NotFound
from ingest.loaders import EXTENSIONS, document_id_of
from ingest.pipeline import ingest_paths, remove_sources
from ingest.settings import ingest_settings_of
from server.errors import InvalidRequest
from server.quotas import check_upload_quota
from server.schemas import UploadOutcome

if TYPE_CHECKING:
    from fastapi import UploadFile

    from retrieval.service import RetrievalService
    from server.settings import ServerSettings

MAX_FILES_PER_REQUEST = 20
_COPY_BLOCK = 1 << 20
_MAX_NAME_CHARS = 120
# Served inline; HTML is sandboxed (CSP) so an uploaded page can never run script on the app's origin.
CONTENT_TYPES = {
    "pdf": "application/pdf",
    "markdown": "text/markdown; charset=utf-8",
    "text": "text/plain; charset=utf-8",
    "html": "text/html; charset=utf-8",
}


def sanitize_filename(name: str) -> str:
    """A safe file name from a browser-given one: the last path part, ASCII letters, digits, '.', '-', '_'.

    Raises:
        InvalidRequest: nothing usable is left, or the extension is not one lorag ingests.
    """
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")
    stem, dot, suffix = base.rpartition(".")
    if not dot or not stem:
        raise InvalidRequest(
            f"file {name!r} has no usable name with an extension; upload {_accepted()} files", param="files"
        )
    if "." + suffix.lower() not in EXTENSIONS:
        raise InvalidRequest(
            f"file {name!r}: unsupported type '.{suffix}'; upload {_accepted()} files", param="files"
        )
    stem = stem[: _MAX_NAME_CHARS - len(suffix) - 1]
    return f"{stem}.{suffix.lower()}"


def _accepted() -> str:
    return ", ".join(sorted(EXTENSIONS))


@dataclass(frozen=True)
class RemovedDocument:
    source: str  # as the index recorded it
    upload_removed: bool  # the original was an upload and is deleted too


@dataclass(frozen=True)
class OriginalFile:
    path: Path
    media_type: str


@dataclass
class _Staged:
    outcome: UploadOutcome
    path: Path | None = None
    backup: Path | None = None  # the previous upload of the same name, restored if the new one fails


class DocumentUploads:
    """Saves uploads and ingests them, removes documents, finds their originals; one per app (build_services)."""

    def __init__(self, settings: ServerSettings, retrieval: RetrievalService):
        self.settings = settings
        self.retrieval = retrieval
        self._embedder = None
        self._lock = threading.Lock()  # one batch at a time: the embedder and the index writer are shared
        # Held from saving to ingesting, so two uploads of one name never swap files under each other.
        self.batch = asyncio.Lock()

    async def upload(self, tenant: str, files: Sequence[UploadFile]) -> list[UploadOutcome]:
        """Save the files under the tenant's uploads dir and ingest them; one outcome per file, in order.

        A file with an unsupported type, over the size limit, empty or unparsable gets its own outcome; the
        others are still ingested. Re-uploading a name replaces that document.

        Raises:
            InvalidRequest: more than MAX_FILES_PER_REQUEST files.
        """
        if len(files) > MAX_FILES_PER_REQUEST:
            raise InvalidRequest(
                f"files: {len(files)} files in one request is over the limit of {MAX_FILES_PER_REQUEST}", param="files"
            )
        directory = uploads_dir(self.settings.data_dir, tenant)
        max_bytes = ingest_settings_of(self.settings).max_file_bytes
        staged: list[_Staged] = []
        taken: set[str] = set()
        async with self.batch:
            await run_in_threadpool(self._check_quota, tenant, files)
            for upload in files:
                item = await run_in_threadpool(_save, upload, directory, max_bytes=max_bytes, taken=taken)
                if item.path is not None:
                    taken.add(item.path.name)
                staged.append(item)
            await run_in_threadpool(self.ingest, tenant, staged)
        return [item.outcome for item in staged]

    def _check_quota(self, tenant: str, files: Sequence[UploadFile]) -> None:
        """Raises: QuotaCountExceeded / QuotaBytesExceeded before any file of the request is saved."""
        names, new_bytes = [], 0
        for upload in files:
            try:
                names.append(sanitize_filename(upload.filename or ""))
            except InvalidRequest:
                continue  # refused on its own later; it stores nothing
            new_bytes += upload.file.seek(0, os.SEEK_END)
        check_upload_quota(self.settings.quotas, self.settings.data_dir, tenant, names, new_bytes=new_bytes)

    async def delete(self, tenant: str, document_id: str) -> RemovedDocument:
        """Remove the document from the tenant's index; an uploaded original is deleted too.

        Raises: NotFound: the tenant has no such document."""
        record = await run_in_threadpool(self.retrieval.document, tenant, document_id)
        await run_in_threadpool(remove_sources, [record.source], tenant=tenant, settings=self.settings)
        source = Path(record.source)
        removed = False
        if source.parent == uploads_dir(self.settings.data_dir, tenant) and source.is_file():
            source.unlink()
            removed = True
        return RemovedDocument(source=record.source, upload_removed=removed)

    async def original(self, tenant: str, document_id: str) -> OriginalFile:
        """The file the tenant's document was ingested from, with the type to serve it as.

        Raises: NotFound: no such document, or its file is gone or of a type lorag does not ingest."""
        record = await run_in_threadpool(self.retrieval.document, tenant, document_id)
        path = Path(record.source)
        kind = EXTENSIONS.get(path.suffix.lower())
        if kind is None or not path.is_file():
            raise NotFound(f"the original file of document {document_id!r} is no longer at {path.name!r}")
        return OriginalFile(path, CONTENT_TYPES[kind])

    def ingest(self, tenant: str, staged: list[_Staged]) -> None:
        """Ingest the saved files of ``staged`` and fill in their outcomes (worker thread)."""
        from retrieval.embedder import Embedder

        saved = [item for item in staged if item.path is not None]
        if not saved:
            return
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self.settings.embedding)
            try:
                report = ingest_paths(
                    [item.path for item in saved], tenant=tenant, settings=self.settings, embedder=self._embedder
                )
            except BaseException:
                for item in saved:
                    _restore(item)
                raise
        by_source = {outcome.source: outcome for outcome in report.outcomes}
        for item in saved:
            result = by_source.get(str(item.path))
            if result is None or result.status not in ("added", "updated", "unchanged"):
                item.outcome.status = "failed"
                item.outcome.reason = result.reason if result else "the ingest pipeline skipped the file"
                _restore(item)
                continue
            item.outcome.status = result.status
            item.outcome.pages = result.pages
            item.outcome.chunks = result.chunks
            item.outcome.warnings = list(result.warnings)
            if item.backup is not None:
                item.backup.unlink(missing_ok=True)
            item.outcome.document_id = document_id_of(item.path)


def _restore(item: _Staged) -> None:
    """Put back the previous upload of the same name (or remove the failed file)."""
    if item.path is None:
        return
    if item.backup is not None:
        os.replace(item.backup, item.path)
    else:
        item.path.unlink(missing_ok=True)


def _save(upload: UploadFile, directory: Path, *, max_bytes: int, taken: set[str]) -> _Staged:
    """Copy one upload to ``directory`` atomically; a refused file gets a rejected outcome, never raises.

    ``taken`` holds the names saved earlier in the same request (a second file of a name is refused).
    """
    outcome = UploadOutcome(filename=upload.filename or "", status="rejected")
    try:
        name = sanitize_filename(upload.filename or "")
    except InvalidRequest as error:
        outcome.reason = str(error)
        return _Staged(outcome)
    outcome.saved_as = name
    if name in taken:
        outcome.reason = f"file {name!r} appears twice in this upload"
        return _Staged(outcome)
    make_private_dir(directory)
    target = directory / name
    tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.part"
    size = 0
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE), "wb") as handle:
            upload.file.seek(0)
            while block := upload.file.read(_COPY_BLOCK):
                size += len(block)
                if size > max_bytes:
                    outcome.reason = f"file {name!r} is over the upload limit of {max_bytes} bytes"
                    return _Staged(outcome)
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        if size == 0:
            outcome.reason = f"file {name!r} is empty"
            return _Staged(outcome)
        backup = None
        if target.exists():
            backup = directory / f".{name}.previous"
            os.replace(target, backup)
        os.replace(tmp, target)
        return _Staged(outcome, target, backup)
    finally:
        tmp.unlink(missing_ok=True)
