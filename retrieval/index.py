"""One tenant's search index: vectors in FAISS, chunk text and metadata in SQLite, a JSON manifest.

Files in ``<data_dir>/tenants/<tenant>/index/``: ``manifest.json`` (format version, embedder name and
dimension, index type), ``chunks.sqlite`` (documents, chunks, and the current vector *generation*),
``vectors-<generation>.faiss`` (one vector per embedded window of each chunk; ids in ``retrieval.store``),
and ``write.lock``.

Commit protocol (crash-safe at every instant): under an exclusive ``fcntl`` lock on ``write.lock``
(one writer per tenant; readers never take it), the new vectors are written to a temporary file,
fsynced and renamed to ``vectors-<g+1>.faiss``; then one SQLite transaction stores the changed rows
together with ``generation = g+1``; only after that commits are older vector files deleted. A crash
before the SQLite commit leaves SQLite naming generation ``g``, whose file still exists (the orphan
``g+1`` file is overwritten by the next commit); a crash after it leaves the new, complete state.
Readers load the vector file of the generation SQLite names, so vectors and rows always agree;
:meth:`TenantIndex.refresh` picks up commits made by other processes.
"""

import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.errors import LoragError, NotFound
from retrieval.keyword import KeywordIndex, TermWeights
from core.atomic import fsync_path
from retrieval.manifest import IndexManifest, read_manifest, write_manifest
from retrieval.store import (
    ChunkStore, ChunkWriter, check_document, chunk_rowids_of, create_schema, vector_ids_of,
)
from core.datadir import PRIVATE_FILE_MODE, index_dir, make_private_dir, make_private_file
from core.records import Chunk, DocumentRecord
from retrieval.vector_store import FaissVectorStore

log = logging.getLogger(__name__)

STORE_NAME = "chunks.sqlite"
LOCK_NAME = "write.lock"
# Window hits fetched per chunk wanted in a dense search, before widening (see TenantIndex.search_dense).
WINDOWS_FETCHED_PER_CHUNK = 4


def vectors_path(directory: Path, generation: int) -> Path:
    return directory / f"vectors-{generation:08d}.faiss"


class TenantIndex:
    """Read access to one tenant's index (thread-safe) and the entry point for atomic updates."""

    def __init__(self, directory: Path, *, tenant: str, manifest: IndexManifest):
        self.directory = Path(directory)
        self.tenant = tenant
        self.manifest = manifest
        self.store = ChunkStore(self.directory / STORE_NAME, tenant=tenant)
        self._lock = threading.Lock()
        self._generation = -1
        self._chunk_count = 0  # chunks of the loaded generation (vectors are per window, so not len(vectors))
        self._vectors = FaissVectorStore.empty(manifest.dimension, index_type=manifest.index_type)
        self._keyword: tuple[int, KeywordIndex] | None = None
        self._readable: tuple[object, object] | None = None  # (loaded vectors, their id-mapped copy), see export
        self._identity = _dir_identity(self.directory)
        _clean_unreferenced_generations(self.directory, self.store)
        self._load()

    @classmethod
    def open(
        cls,
        data_dir: Path,
        tenant: str,
        *,
        embedder_name: str,
        dimension: int,
        index_type: str = "flat",
        create: bool = True,
    ) -> "TenantIndex":
        """Open the tenant's index, creating an empty one when ``create`` is true.

        Raises:
            Conflict: the index was built with another embedder name or dimension.
            NotFound: there is no index and ``create`` is false.
            LoragError: the tenant name or the index type is invalid, or the manifest is unreadable.
        """
        directory = index_dir(data_dir, tenant)
        manifest = read_manifest(directory)
        if manifest is None:
            if not create:
                raise NotFound(
                    f"tenant {tenant!r} has no index in {str(directory)!r}",
                    hint=f"Ingest documents first: lorag ingest PATH --tenant {tenant}",
                )
            manifest = _create(directory, embedder_name=embedder_name, dimension=dimension, index_type=index_type)
        manifest.check_embedder(embedder_name=embedder_name, dimension=dimension, where=directory)
        if manifest.index_type != index_type:
            log.warning(
                "tenant %s: index was built as %r, keeping that (retrieval.index_type %r applies to new tenants)",
                tenant, manifest.index_type, index_type,
            )
        return cls(directory, tenant=tenant, manifest=manifest)

    @staticmethod
    def exists(data_dir: Path, tenant: str) -> bool:
        return (index_dir(data_dir, tenant) / "manifest.json").is_file()

    # ---- reading -------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def vectors(self) -> FaissVectorStore:
        """The loaded vector store (its ``nprobe``/``ef_search`` may be tuned; never add to it directly)."""
        return self._vectors

    def __len__(self) -> int:
        """The number of chunks in the loaded generation (each has one or more vectors)."""
        return self._chunk_count

    def close(self) -> None:
        self.store.close()

    def moved(self) -> bool:
        """Whether the index directory was removed or replaced since this was opened (its tenant was removed
        or quarantined): the caller must drop this instance, whose open files still show the old data."""
        try:
            return _dir_identity(self.directory) != self._identity
        except OSError:
            return True

    def refresh(self) -> bool:
        """Reload if another process committed since this one loaded; returns whether it reloaded."""
        if self.store.generation() == self._generation:
            return False
        self._load()
        return True

    def _load(self) -> None:
        with self._lock:
            for _ in range(20):
                generation, chunk_count = self.store.generation_and_count()
                if generation == self._generation:
                    return
                if generation == 0:
                    vectors = FaissVectorStore.empty(self.manifest.dimension, index_type=self.manifest.index_type)
                    break
                try:
                    vectors = FaissVectorStore.load(
                        vectors_path(self.directory, generation),
                        index_type=self.manifest.index_type,
                        dimension=self.manifest.dimension,
                    )
                    break
                except RuntimeError:  # a newer commit deleted that file between our two reads: read again
                    if self.store.generation() == generation:
                        raise
            else:
                raise LoragError(f"index {str(self.directory)!r} keeps changing; cannot load a stable generation")
            self._vectors, self._generation, self._chunk_count = vectors, generation, chunk_count
            log.debug("tenant %s: loaded generation %d (%d vectors)", self.tenant, generation, len(vectors))

    def documents(self) -> list[DocumentRecord]:
        return self.store.documents()

    def document(self, document_id: str) -> DocumentRecord | None:
        return self.store.document(document_id)

    def document_by_source(self, source: str) -> DocumentRecord | None:
        return self.store.document_by_source(source)

    def chunk(self, chunk_id: str) -> Chunk | None:
        return self.store.chunk(chunk_id)

    def chunks_of(self, document_id: str) -> list[Chunk]:
        """The document's chunks in reading order (empty when the document is unknown)."""
        return self.store.chunks_of(document_id)

    def neighbours(self, chunk_id: str, *, before: int = 1, after: int = 1) -> list[Chunk]:
        """The chunk itself with up to ``before``/``after`` chunks of the same document around it, in reading order."""
        return self.store.neighbours(chunk_id, before=before, after=after)

    def search_dense(self, vector: np.ndarray, k: int, *, sources: Sequence[str] | None = None) -> list[tuple[Chunk, float]]:
        """The ``k`` chunks with the highest inner product between ``vector`` ``(dimension,)`` and one of their
        vectors (a chunk scores by its best window), best first.

        Raises:
            LoragError: ``vector`` does not have the index's dimension.
        """
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.manifest.dimension:
            raise LoragError(f"query vector has dimension {vector.shape[0]}, index has {self.manifest.dimension}")
        allowed = None
        if sources is not None:
            allowed = self.store.vector_ids_of_sources(sources)
            if len(allowed) == 0:
                return []
        vectors = self._vectors
        available = len(vectors) if allowed is None else len(allowed)
        # Windows of one chunk often rank together: fetch a few times k windows, and more while fewer than
        # k distinct chunks come back. The first hit of a chunk is its best window, so the k chunks found
        # are exactly the k best (for an exact index).
        wanted = min(k * WINDOWS_FETCHED_PER_CHUNK, available)
        while True:
            scores, ids = vectors.search(vector[None, :], wanted, allowed_ids=allowed)
            found = ids[0] >= 0
            best: dict[int, float] = {}  # chunk rowid -> its best window's score, best first
            for rowid, score in zip(chunk_rowids_of(ids[0][found]).tolist(), scores[0][found].tolist()):
                best.setdefault(rowid, score)
            if len(best) >= k or wanted >= available:
                break
            wanted = min(wanted * 4, available)
        return self._join(list(best.items())[:k])

    def search_keyword(self, query: str, k: int, *, sources: Sequence[str] | None = None) -> list[tuple[Chunk, float]]:
        """The ``k`` best BM25 matches for ``query`` (chunks sharing no term with it are left out)."""
        allowed = None
        if sources is not None:
            allowed = self.store.rowids_of_sources(sources)
            if len(allowed) == 0:
                return []
        return self._join(self._keyword_index().search(query, k, allowed_rowids=allowed))

    def term_weights(self, text: str) -> TermWeights:
        """``text``'s keyword terms weighted by their rarity among this index's chunks (BM25's idf)."""
        return self._keyword_index().term_weights(text)

    def _keyword_index(self) -> KeywordIndex:
        with self._lock:
            generation = self._generation
            if self._keyword is None or self._keyword[0] != generation:
                rowids, texts = self.store.texts()
                self._keyword = (generation, KeywordIndex(rowids, texts))
            return self._keyword[1]

    def export_document(self, source: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        """The document stored under ``source`` with its chunks (reading order) and their window vectors
        ``(n, dimension)`` read back from the vector file, as :meth:`IndexUpdate.put_document` takes them (the
        copy tool moves tenants between stores with this, without embedding again); None when there is none."""
        import faiss

        record = self.store.document_by_source(source)
        if record is None:
            return None
        rowids, counts = self.store.rowids_and_vector_counts_of_source(source)
        chunks = self.store.chunks_by_rowid(rowids.tolist())
        ids = vector_ids_of(rowids, counts)
        store = self._vectors
        if store.index_type == "ivf" and store.index is not None:
            # IVF lists need an id map to read vectors back; made once per loaded vector file, not per
            # document (a copy of the whole index each time made a tenant's copy quadratic).
            if self._readable is None or self._readable[0] is not store:
                mapped = store.copy()
                mapped.index.set_direct_map_type(faiss.DirectMap.Hashtable)
                self._readable = (store, mapped)
            store = self._readable[1]
        vectors = np.stack([store.index.reconstruct(int(i)) for i in ids]) if len(ids) else \
            np.zeros((0, self.manifest.dimension), dtype=np.float32)
        return record, [chunks[int(rowid)] for rowid in rowids], vectors.astype(np.float32)

    def _join(self, hits: list[tuple[int, float]]) -> list[tuple[Chunk, float]]:
        chunks = self.store.chunks_by_rowid(rowid for rowid, _ in hits)
        # A row deleted by a commit this process has not loaded yet is simply skipped.
        return [(chunks[rowid], score) for rowid, score in hits if rowid in chunks]

    # ---- writing -------------------------------------------------------------------------------

    def update(self) -> "IndexUpdate":
        """Start an update: blocks while another process or thread holds this tenant's write lock."""
        return IndexUpdate(self)


class IndexUpdate:
    """Staged changes to one tenant's index; invisible to readers until :meth:`commit`.

    Use as a context manager; leaving the block without ``commit()`` (or by an exception) discards them.
    """

    def __init__(self, index: TenantIndex):
        self.index = index
        self._lock_file = open(_private_lock_file(index.directory), "a+b")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            self._writer = ChunkWriter(index.directory / STORE_NAME)
        except BaseException:
            self._release()
            raise
        self._removed: list[np.ndarray] = []
        self._added_ids: list[np.ndarray] = []
        self._added_vectors: list[np.ndarray] = []
        self._open = True

    def __enter__(self) -> "IndexUpdate":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def put_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Store ``record`` with its ``chunks`` (reading order) and their ``vectors``, replacing any document
        stored under the same source. ``vectors`` is ``(n, dimension)``: the vectors of each chunk's
        ``embedded_texts()``, chunk after chunk (n = the number of chunks when no chunk has windows).

        Raises:
            LoragError: the shapes disagree, or a chunk belongs to another source or tenant.
        """
        self._check_open()
        vectors = check_document(record, chunks, vectors, tenant=self.index.tenant,
                                 dimension=self.index.manifest.dimension)
        self._removed.append(self._writer.remove_source(record.source))
        self._added_ids.append(self._writer.insert_document(record, chunks))
        self._added_vectors.append(vectors)

    def remove_source(self, source: str) -> bool:
        """Remove the document stored under ``source``; returns whether there was one."""
        self._check_open()
        if not self._writer.has_source(source):
            return False
        self._removed.append(self._writer.remove_source(source))
        return True

    def commit(self) -> None:
        """Make every staged change visible at once (see the module docstring for why this is crash-safe).

        Raises:
            LoragError: the update was already committed or discarded.
        """
        self._check_open()
        index = self.index
        try:
            removed = np.concatenate(self._removed) if self._removed else np.zeros(0, dtype=np.int64)
            if len(removed) == 0 and not self._added_ids:
                # Nothing to commit, but a run killed between an earlier commit and its clean-up left files behind.
                _delete_old_generations(index.directory, keep=self._writer.generation)
                self.discard()
                return
            vectors = self._base_vectors().copy()
            vectors.remove(removed)
            if self._added_ids:
                ids, added = np.concatenate(self._added_ids), np.concatenate(self._added_vectors)
                keep = ~np.isin(ids, removed)  # rows added and then replaced within this same update
                if not keep.all():  # a boolean index copies: a large batch's vectors would be held twice
                    ids, added = ids[keep], added[keep]
                vectors.add(ids, added)
            generation = self._writer.generation + 1
            path = vectors_path(index.directory, generation)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            vectors.save(tmp)
            make_private_file(tmp)
            os.replace(tmp, path)
            fsync_path(index.directory)
            chunk_count = self._writer.commit(generation)  # the commit point
        except BaseException:
            self.discard()
            raise
        self._open = False
        try:
            _delete_old_generations(index.directory, keep=generation)  # under the lock: no writer is mid-commit
        finally:
            self._release()
        with index._lock:
            index._vectors, index._generation, index._chunk_count = vectors, generation, chunk_count
        log.info("tenant %s: committed generation %d (%d chunks, %d vectors)", index.tenant, generation, chunk_count,
                 len(vectors))

    def discard(self) -> None:
        """Drop every staged change and release the write lock (what leaving the block does)."""
        if not self._open:
            return
        self._open = False
        try:
            self._writer.rollback()
        finally:
            self._release()

    def _base_vectors(self) -> FaissVectorStore:
        index = self.index
        if self._writer.generation == index.generation:
            return index._vectors
        # Another process committed since this one loaded: build on its state, not on ours.
        if self._writer.generation == 0:
            return FaissVectorStore.empty(index.manifest.dimension, index_type=index.manifest.index_type)
        return FaissVectorStore.load(
            vectors_path(index.directory, self._writer.generation),
            index_type=index.manifest.index_type,
            dimension=index.manifest.dimension,
        )

    def _check_open(self) -> None:
        if not self._open:
            raise LoragError(f"index update of tenant {self.index.tenant!r} was already committed or discarded")

    def _release(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def _create(directory: Path, *, embedder_name: str, dimension: int, index_type: str) -> IndexManifest:
    FaissVectorStore.empty(dimension, index_type=index_type)  # validates index_type before anything is written
    make_private_dir(directory)
    with open(_private_lock_file(directory), "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # two processes creating the same tenant: one manifest wins
        manifest = read_manifest(directory)
        if manifest is None:
            create_schema(directory / STORE_NAME)
            manifest = IndexManifest(
                embedder_name=embedder_name,
                dimension=dimension,
                index_type=index_type,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            write_manifest(directory, manifest)  # last: an index without a manifest does not exist yet
    return manifest


def _private_lock_file(directory: Path) -> Path:
    path = directory / LOCK_NAME
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE_MODE))
    return path


def _dir_identity(directory: Path) -> tuple[int, int]:
    stat = directory.stat()
    return stat.st_dev, stat.st_ino


def _clean_unreferenced_generations(directory: Path, store: ChunkStore) -> None:
    """Delete vector files of generations SQLite no longer names (a kill after a commit, before its clean-up).

    Only when no writer holds the lock: a writer mid-commit has written a file SQLite does not name yet.
    """
    try:
        lock_file = open(_private_lock_file(directory), "a+b")
    except OSError:  # a read-only data dir: leave the files, readers never look at them
        return
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        try:
            current = store.generation()
            stale = [path for path in directory.glob("vectors-*.faiss") if path != vectors_path(directory, current)]
            if stale or any(directory.glob(".vectors-*.tmp-*")):
                log.warning("tenant %s: removing %d vector file(s) of old generations left by an interrupted "
                            "run", directory.parent.name, len(stale))
                try:
                    _delete_old_generations(directory, keep=current)
                except OSError as error:  # readers never look at them: not worth refusing to open the index
                    log.warning("tenant %s: cannot remove old vector files: %s", directory.parent.name, error)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _delete_old_generations(directory: Path, *, keep: int) -> None:
    keep_name = vectors_path(directory, keep).name
    for path in directory.glob("vectors-*.faiss"):
        if path.name != keep_name:
            path.unlink(missing_ok=True)
    for path in directory.glob(".vectors-*.tmp-*"):
        path.unlink(missing_ok=True)
