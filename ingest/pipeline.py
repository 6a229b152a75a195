"""The ingest pipeline: files -> pages -> chunks -> vectors -> one atomic index commit (per batch).

Used by ``lorag ingest`` and by the server's upload endpoint. Unchanged files (same source, same
content hash) cost no parsing and no embedding; a bad file is reported and skipped, never fatal.
"""

import gc
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import numpy as np

from ingest.chunking import Chunker, check_chunking
from ingest.discovery import discover_files
from ingest.loaders import LoadError, document_id_of, load_document
from ingest.progress import IngestProgress
from ingest.report import FileOutcome, IngestReport
from ingest.settings import IngestSettings, ingest_settings_of
from core.errors import LoragError, NotFound
from retrieval.store import vector_count
from core.settings import Settings
from core.datadir import index_dir, validate_tenant_name
from core.records import Chunk, DocumentRecord

log = logging.getLogger(__name__)

# Texts per embed call: large enough for the embedder's length sorting to pay off, small enough that
# a huge document never holds more than this many token tensors at once.
EMBED_GROUP = 1024


@dataclass
class PreparedFile:
    """A file after loading and chunking (done ahead, in a worker thread), waiting to be embedded."""

    outcome: FileOutcome
    record: DocumentRecord | None = None
    chunks: list[Chunk] = field(default_factory=list)


def ingest_paths(
    paths: Sequence[str | Path],
    *,
    tenant: str,
    settings: Settings,
    embedder=None,
    prune: bool = False,
    progress: IngestProgress | None = None,
) -> IngestReport:
    """Ingest every supported file under ``paths`` into ``tenant``'s index.

    Each file ends as added, updated, unchanged, failed (with the reason) or skipped (hidden or
    unsupported). With ``prune``, documents whose source lay under ``paths`` but no longer exists are
    removed. Changes are committed atomically every ``ingest.commit_every_chunks`` chunks and at the end,
    so a crash keeps the last committed state.

    Raises:
        LoragError: invalid tenant name, an index built with another embedder (Conflict), or the
            embedding model cannot be loaded. Problems with single files never raise.
    """
    from retrieval.embedder import Embedder
    from retrieval.tenant_indexes import open_index, stored_manifest

    started = time.perf_counter()
    validate_tenant_name(tenant)
    check_chunking(settings.chunking)
    limits = ingest_settings_of(settings)
    report = IngestReport(tenant=tenant)
    found = discover_files([Path(p) for p in paths])
    for path in found.missing:
        _note(report.add(FileOutcome(_display(path), "failed", "no such file or folder")))
    for path, reason in found.unreadable:
        _note(report.add(FileOutcome(_display(path), "failed", reason)))
    for path, reason in found.skipped:
        _note(report.add(FileOutcome(_display(path), "skipped", reason)))
    for path, reason in found.broken_links:  # a mistake in the folder worth fixing: a warning, not a note
        _note(report.add(FileOutcome(_display(path), "skipped", reason)), level=logging.WARNING)
    if not found.files and not prune:  # nothing to add: create no index and load no model
        report.seconds = time.perf_counter() - started
        return report

    embedder = embedder or Embedder(settings.embedding)
    # The model loads on first use: a run where every file is unchanged never loads it.
    manifest = stored_manifest(settings, tenant)
    index = open_index(
        settings,
        tenant,
        embedder_name=embedder.name,
        dimension=manifest.dimension if manifest and manifest.embedder_name == embedder.name else embedder.dimension,
    )
    chunker = cache(lambda: Chunker(embedder.tokenizer, settings.chunking))  # called from one thread only
    context_weight = settings.chunking.context_weight
    if progress is not None:
        progress.start(len(found.files))
    loop_started = time.perf_counter()

    def file_done(chunks: int) -> None:
        # The bar and the summary's chunks/s share this one clock, so they cannot disagree.
        report.processing_seconds = time.perf_counter() - loop_started
        if progress is not None:
            progress.file_done(chunks=chunks, elapsed=report.processing_seconds)

    update = None
    pending = 0  # chunks staged in the open update
    dirty = False
    try:
        _freeze_long_lived_objects()
        update = index.update()
        waiting: list[PreparedFile] = []  # parsed files whose chunks are embedded together
        for prepared in _prepare_ahead(found.files, index=index, chunker=chunker, tenant=tenant, limits=limits,
                                       names=found.names):
            _note(report.add(prepared.outcome))
            if prepared.record is None:
                file_done(0)
                continue
            waiting.append(prepared)
            if sum(len(p.chunks) for p in waiting) < EMBED_GROUP:
                continue  # small files share one embed call: per-call overhead dominates tiny batches
            pending += _store(waiting, embedder=embedder, update=update, context_weight=context_weight,
                              on_file_done=file_done)
            _freeze_long_lived_objects()  # the model is loaded now: its objects join the skipped ones
            waiting, dirty = [], True
            if pending >= limits.commit_every_chunks:
                update.commit()
                report.commits += 1
                pending, dirty = 0, False
                update = index.update()
        if waiting:
            _store(waiting, embedder=embedder, update=update, context_weight=context_weight, on_file_done=file_done)
            dirty = True
        if prune:
            for source in _vanished_sources(index, found_roots=[Path(os.path.abspath(p)) for p in paths]):
                update.remove_source(source)
                dirty = True
                _note(report.add(FileOutcome(source, "removed", "no longer exists")))
        if dirty:
            update.commit()
            report.commits += 1
    finally:
        gc.unfreeze()
        if update is not None:
            update.discard()  # no-op after commit; drops a half-staged batch on error
        index.close()
        if progress is not None:
            progress.close()
    report.seconds = time.perf_counter() - started
    return report


def remove_sources(sources: Sequence[str], *, tenant: str, settings: Settings) -> int:
    """Remove the documents ingested from ``sources`` (files, or folders meaning every document under them).

    Nothing is removed unless every source matches at least one document. Returns the number removed.

    Raises:
        LoragError: a source is empty (it would otherwise match every document under "/").
        NotFound: the tenant has no index, or a source matches no document.
    """
    if not sources or any(not str(source).strip() for source in sources):
        raise LoragError("empty source given to remove", hint="Name files or folders as `lorag docs` lists them")
    index = _open_existing(tenant, settings)
    try:
        stored = [record.source for record in index.documents()]
        matched: list[str] = []
        unknown: list[str] = []
        for given in sources:
            hits = _sources_under(stored, given)
            (matched.extend(hits) if hits else unknown.append(given))
        if unknown:
            raise NotFound(
                f"tenant {tenant!r} has no document from {', '.join(map(repr, unknown))}",
                hint=f"List them with: lorag docs --tenant {tenant}",
            )
        with index.update() as update:
            removed = sum(update.remove_source(source) for source in dict.fromkeys(matched))
            update.commit()
        return removed
    finally:
        index.close()


def list_documents(*, tenant: str, settings: Settings) -> list[DocumentRecord]:
    """The tenant's documents, sorted by source.

    Raises:
        NotFound: the tenant has no index.
    """
    index = _open_existing(tenant, settings)
    try:
        return sorted(index.documents(), key=lambda record: record.source)
    finally:
        index.close()


# ---------------------------------------------------------------- steps


def _prepare_ahead(
    files: list[Path], *, index, chunker: Callable[[], Chunker], tenant: str, limits: IngestSettings,
    names: dict[Path, str],
) -> Iterator[PreparedFile]:
    """Yield prepared files in order, parsing up to ``limits.prefetch_files`` ahead in a thread.

    Parsing (pypdf, pure Python) overlaps with embedding, which releases the GIL inside torch.
    """

    def prepare(path: Path) -> PreparedFile:
        return _prepare(path, index=index, chunker=chunker, tenant=tenant, limits=limits, name=names[path])

    if limits.prefetch_files == 0:
        yield from map(prepare, files)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-parse") as pool:
        ahead: deque = deque()
        for path in files:
            ahead.append(pool.submit(prepare, path))
            if len(ahead) > limits.prefetch_files:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _prepare(
    path: Path, *, index, chunker: Callable[[], Chunker], tenant: str, limits: IngestSettings, name: str
) -> PreparedFile:
    """``name``: what clients will be shown for the document (its path relative to what was ingested)."""
    source = str(path)
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        reason = "file name is not valid UTF-8; rename the file"
        return PreparedFile(FileOutcome(_display(path), "failed", reason))
    try:
        size = path.stat().st_size
        if size > limits.max_file_bytes:  # checked before hashing: never read a file we will refuse
            raise LoadError(
                f"file is {size / 2**20:.1f} MiB, over the {limits.max_file_bytes / 2**20:.1f} MiB limit",
                hint="Split the file or raise ingest.max_file_bytes (LORAG_INGEST__MAX_FILE_BYTES)",
            )
        document_id = document_id_of(path)
        existing = index.document_by_source(source)
        if existing is not None and existing.document_id == document_id:
            return PreparedFile(FileOutcome(source, "unchanged", pages=existing.pages))
        document = load_document(path, settings=limits)
        chunks = list(
            chunker().split_pages(
                document.pages, tenant=tenant, document_id=document_id, source=source, title=document.title
            )
        )
    except LoadError as error:
        return PreparedFile(FileOutcome(source, "failed", _without_path(str(error), source)))
    except OSError as error:
        return PreparedFile(FileOutcome(source, "failed", f"cannot read: {error.strerror or error}"))
    except LoragError:  # not about this file (e.g. the embedding model cannot load): stop the run
        raise
    except Exception as error:  # a parser bug on one hostile file must not stop the batch
        log.debug("unexpected error on %s", source, exc_info=True)
        return PreparedFile(FileOutcome(source, "failed", f"cannot parse ({type(error).__name__}: {error})"))
    record = DocumentRecord(
        document_id=document_id,
        tenant=tenant,
        source=source,
        pages=len(document.pages),
        chunk_count=len(chunks),
        size_bytes=size,
        ingested_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        name=name,
    )
    status = "added" if existing is None else "updated"
    warnings = [_without_path(warning, source) for warning in document.warnings]
    return PreparedFile(FileOutcome(source, status, pages=len(document.pages), warnings=warnings), record, chunks)


def _store(
    files: list[PreparedFile], *, embedder, update, context_weight: float, on_file_done: Callable[[int], None]
) -> int:
    """Embed the chunks of ``files`` together and stage each document; returns the number of chunks."""
    vectors = embed_chunks(embedder, [chunk for prepared in files for chunk in prepared.chunks],
                           context_weight=context_weight)
    offset = chunks = 0
    for prepared in files:
        count = len(prepared.chunks)
        texts = sum(vector_count(chunk) for chunk in prepared.chunks)
        update.put_document(prepared.record, prepared.chunks, vectors[offset : offset + texts])
        prepared.outcome.chunks = count
        offset += texts
        chunks += count
        on_file_done(count)
    return chunks


def embed_chunks(embedder, chunks: Sequence[Chunk], *, context_weight: float) -> np.ndarray:
    """The vectors ``(n, dimension)`` that stand for ``chunks`` in the index: one per ``embedded_texts()``
    entry, chunk after chunk, each ``normalise(text vector + context_weight * context line vector)`` when the
    chunk has a context line.

    Why a weighted sum rather than the context line written in front of each window: a 40-token window
    embedded after a 20-token article title is mostly title (window dense hit@1 on COVID-QA fell from 0.365
    to 0.255; benchmarks/RESULTS.md, "Page furniture and window context"), while a fixed weight gives every
    title the same small share.
    """
    vectors = _embed(embedder, [text for chunk in chunks for text in chunk.embedded_texts()])
    contexts = sorted({chunk.context for chunk in chunks if chunk.context})
    if not contexts or context_weight == 0:
        return vectors
    return mix_context(vectors, chunks, dict(zip(contexts, _embed(embedder, contexts))), weight=context_weight)


def mix_context(
    vectors: np.ndarray, chunks: Sequence[Chunk], context_vectors: Mapping[str, np.ndarray], *, weight: float
) -> np.ndarray:
    """``vectors`` (one per embedded text of ``chunks``, in order) with each chunk's context line vector mixed
    in at ``weight`` and renormalised, in place; vectors of chunks without a context line stay as they are."""
    offset = 0
    for chunk in chunks:
        count = vector_count(chunk)
        if chunk.context:
            mixed = vectors[offset : offset + count] + weight * context_vectors[chunk.context]
            vectors[offset : offset + count] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        offset += count
    return vectors


def _embed(embedder, texts: list[str]) -> np.ndarray:
    """Vectors ``(len(texts), dimension)`` float32, embedded in groups so memory stays bounded."""
    vectors = np.empty((len(texts), embedder.dimension), dtype=np.float32)
    for start in range(0, len(texts), EMBED_GROUP):
        group = texts[start : start + EMBED_GROUP]
        vectors[start : start + len(group)] = embedder.embed_documents(group)
    return vectors


def _freeze_long_lived_objects() -> None:
    """Keep the garbage collector's full passes off the objects that exist now, until ``gc.unfreeze()``.

    With torch and transformers imported, a process tracks about 500k objects, and pypdf allocates so many
    that full collections run again and again over all of them: parsing three FinanceBench PDFs took 5.2 s
    instead of 2.9 s. Frozen objects are still freed by reference counting; ``ingest_paths`` unfreezes at
    the end, handing any cycles among them back to the collector, so nothing is leaked.
    """
    gc.freeze()


def _vanished_sources(index, *, found_roots: list[Path]) -> list[str]:
    """Stored sources under one of ``found_roots`` whose file no longer exists."""
    vanished = []
    for record in index.documents():
        if any(_is_under(record.source, str(root)) for root in found_roots) and not os.path.exists(record.source):
            vanished.append(record.source)
    return vanished


def _sources_under(stored: list[str], given: str) -> list[str]:
    candidates = {given, os.path.abspath(given)}
    return [source for source in stored if any(_is_under(source, root) for root in candidates)]


def _is_under(source: str, root: str) -> bool:
    root = root.rstrip(os.sep) or os.sep
    return source == root or source.startswith(root if root.endswith(os.sep) else root + os.sep)


def _open_existing(tenant: str, settings: Settings):
    """Open without loading the embedder: removing and listing need only what the manifest says."""
    from retrieval.tenant_indexes import open_index, stored_manifest

    manifest = stored_manifest(settings, tenant)
    if manifest is None:
        files = settings.retrieval.store == "files"
        where = repr(str(index_dir(settings.data_dir, tenant))) if files else "the PostgreSQL store"
        raise NotFound(
            f"tenant {tenant!r} has no index in {where}",
            hint=f"Ingest documents first: lorag ingest PATH --tenant {tenant}",
        )
    return open_index(
        settings,
        tenant,
        embedder_name=manifest.embedder_name,
        dimension=manifest.dimension,
        index_type=manifest.index_type,
        create=False,
    )


def _note(outcome: FileOutcome, *, level: int = logging.INFO) -> None:
    """One line per problem, naming the file: failures and warnings as warnings, skips at ``level``."""
    lines = [(logging.WARNING, warning) for warning in outcome.warnings]
    if outcome.status == "failed":
        lines.append((logging.WARNING, f"failed: {outcome.reason}"))
    elif outcome.status == "skipped":
        lines.append((level, f"skipped: {outcome.reason}"))
    elif outcome.status == "removed":
        lines.append((logging.INFO, f"removed: {outcome.reason}"))
    for level, message in lines:
        log.log(level, "%s: %s", outcome.source, message)


def _without_path(message: str, source: str) -> str:
    """Loader messages start with the path; outcomes carry it separately."""
    prefix = f"{source}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _display(path: Path) -> str:
    """A printable name even for file names that are not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")
