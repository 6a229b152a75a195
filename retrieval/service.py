"""Retrieval for the server and training: one embedder per process, each tenant's index opened once and refreshed."""

import logging
import threading
from collections.abc import Sequence

from retrieval.embedder import Embedder
from core.errors import NotFound
from retrieval.index import TenantIndex
from retrieval.keyword import TermWeights
from retrieval.tenant_indexes import index_exists, open_index
from retrieval.reranker import load_reranker
from retrieval.retriever import HybridRetriever
from core.settings import Settings
from core.datadir import validate_tenant_name
from core.records import Chunk, DocumentRecord, Passage, document_name

log = logging.getLogger(__name__)


class NoIndex(NotFound):
    """The tenant has no index, or an empty one: searching it could only return nothing."""

    code = "no_index"


class UnknownSources(NotFound):
    """A ``sources`` filter names no document of the tenant; searching everything instead would mislead."""

    param = "sources"
    code = "unknown_sources"


class RetrievalService:
    """Thread-safe: requests for any tenants may call it concurrently."""

    def __init__(self, settings: Settings, *, embedder: Embedder | None = None):
        self.settings = settings
        self.embedder = embedder or Embedder(settings.embedding)
        self._indexes: dict[str, TenantIndex] = {}
        self._lock = threading.Lock()
        self._embed_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self._reranker_lock = threading.Lock()

        self._reranker: tuple = ()  # (reranker or None,) once loading was tried

    @property
    def reranker(self):
        """The configured cross-encoder, loaded on first use; None when none is configured or loadable."""
        with self._reranker_lock:
            if not self._reranker:
                self._reranker = (load_reranker(self.settings.retrieval, device=self.settings.embedding.device),)
            return self._reranker[0]

    def index(self, tenant: str) -> TenantIndex | None:  # or a PgTenantIndex: the same interface
        """The tenant's index, reloaded if another process committed since; None when it has none.

        Raises:
            LoragError: invalid tenant name. Conflict: the index was built with another embedder.
        """
        validate_tenant_name(tenant)
        with self._lock:
            index = self._indexes.get(tenant)
            if index is not None and index.moved():  # the tenant was removed: never serve its old files
                index.close()
                del self._indexes[tenant]
                index = None
            if index is None:
                if not index_exists(self.settings, tenant):
                    return None
                index = open_index(
                    self.settings,
                    tenant,
                    embedder_name=self.embedder.name,
                    dimension=self.embedder.dimension,
                    create=False,
                )
                self._indexes[tenant] = index
        try:
            index.refresh()
        except NotFound:  # removed by another process since it was opened here (a shared PostgreSQL store)
            with self._lock:
                if self._indexes.get(tenant) is index:
                    del self._indexes[tenant]
            return self.index(tenant) if index_exists(self.settings, tenant) else None
        return index

    def retrieve(
        self,
        tenant: str,
        query: str,
        *,
        k: int | None = None,
        sources: Sequence[str] | None = None,
        mode: str | None = None,
        require_index: bool = False,
    ) -> list[Passage]:
        """The ``k`` best passages of ``tenant`` for ``query``.

        Without an index (or with an empty one) the result is empty, or with ``require_index`` (a search
        API, where an empty list would pass for "nothing relevant") :class:`NoIndex` is raised.

        Raises:
            NoIndex: ``require_index`` and the tenant has no indexed document.
            UnknownSources: ``sources`` names no document of the tenant.
            LoragError: empty query, ``k`` out of range, unknown mode or tenant name.
        """
        index = self.index(tenant)
        if index is None or len(index) == 0:
            if require_index:
                raise NoIndex(
                    f"tenant {tenant!r} has no indexed documents, so there is nothing to search",
                    hint=f"Ingest some with `lorag ingest PATH --tenant {tenant}` or POST /v1/documents",
                )
            if sources:
                raise UnknownSources(f"sources {list(sources)!r}: tenant {tenant!r} has no indexed documents")
            return []
        settings = self.settings.retrieval
        retriever = HybridRetriever(index, _LockedEmbedder(self.embedder, self._embed_lock), settings,
                                    reranker=self.reranker)
        if sources:
            named = _stored_sources(index, sources)
            if not named:
                raise UnknownSources(
                    f"sources {list(sources)!r} match no document of tenant {tenant!r}",
                    hint="Name documents as GET /v1/documents lists them (their file name or source)",
                )
            sources = named
        return retriever.retrieve(query, k=k, sources=sources, mode=mode)

    def term_weights(self, tenant: str, text: str) -> TermWeights | None:
        """``text``'s keyword terms weighted by how rare each is in ``tenant``'s index (None: no index yet)."""
        index = self.index(tenant)  # an empty index weighs every term as unseen: no count to divide by
        return None if index is None else index.term_weights(text)

    def embed_texts(self, texts: Sequence[str]):
        """``(len(texts), dimension)`` L2-normalised vectors from the retrieval embedder (answer attribution
        compares answer sentences with passage windows in the space the index uses)."""
        with self._embed_lock:
            return self.embedder.embed_documents(texts)

    def chunk(self, tenant: str, chunk_id: str) -> Chunk:
        """Raises: NotFound: no such chunk for this tenant."""
        index = self.index(tenant)
        chunk = index.chunk(chunk_id) if index is not None else None
        if chunk is None:
            raise NotFound(f"chunk {chunk_id!r} not found for tenant {tenant!r}")
        return chunk

    def neighbours(self, tenant: str, chunk_id: str, *, before: int = 1, after: int = 1) -> list[Chunk]:
        """The chunk with its neighbours in reading order. Raises: NotFound: no such chunk."""
        index = self.index(tenant)
        chunks = index.neighbours(chunk_id, before=before, after=after) if index is not None else []
        if not chunks:  # the chunk itself is always in the result when it exists
            raise NotFound(f"chunk {chunk_id!r} not found for tenant {tenant!r}")
        return chunks

    def documents(self, tenant: str) -> list[DocumentRecord]:
        index = self.index(tenant)
        return [] if index is None else index.documents()

    def document(self, tenant: str, document_id: str) -> DocumentRecord:
        """Raises: NotFound: no such document for this tenant."""
        index = self.index(tenant)
        record = index.document(document_id) if index is not None else None
        if record is None:
            raise NotFound(f"document {document_id!r} not found for tenant {tenant!r}")
        return record

    def chunks_of(self, tenant: str, document_id: str) -> list[Chunk]:
        """The document's chunks in reading order. Raises: NotFound: no such document."""
        index = self.index(tenant)
        if index is None or index.document(document_id) is None:
            raise NotFound(f"document {document_id!r} not found for tenant {tenant!r}")
        return index.chunks_of(document_id)


class _LockedEmbedder:
    def __init__(self, embedder: Embedder, lock: threading.Lock):
        self._embedder, self._lock = embedder, lock

    def embed_query(self, text: str):
        with self._lock:
            return self._embedder.embed_query(text)


def _stored_sources(index: TenantIndex, given: Sequence[str]) -> list[str]:
    """The stored sources a ``sources`` filter names: a stored path itself, or a document name as responses
    show it (DocumentRecord.display_name, or the bare file name), which stands for every document of that name."""
    records = index.documents()
    known = {record.source for record in records}
    return list(dict.fromkeys(
        source for name in given for source in
        ([name] if name in known else
         [r.source for r in records if name in (r.display_name, document_name(r.source))])))
