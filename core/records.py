"""The records that flow from ingest through retrieval to citations."""

from dataclasses import dataclass, field
from pathlib import PurePath


def document_name(source: str) -> str:
    """A document's file name: what clients are shown for a document ingested before names were stored
    (Chunk.display_name). The full path it was ingested from stays on the server: a prompt or a response
    never carries it."""
    return PurePath(source).name or source


@dataclass(frozen=True)
class Chunk:
    """A span of one page of one document, as stored in a tenant's index.

    ``start``/``end`` are character offsets into that page's extracted text, so
    ``page_text[start:end] == text``. Pages are numbered from 1; formats without pages have one page.
    """

    id: str  # content hash of (tenant, document_id, page, start, end, text): stable across re-ingest
    tenant: str
    document_id: str  # content hash of the source file's bytes
    source: str  # the path the document was ingested from
    page: int
    start: int
    end: int
    text: str
    heading_path: tuple[str, ...] = ()
    # Page offsets of the sentence windows embedded for this chunk, one vector each (ingest.windows);
    # empty: one vector for the whole text.
    windows: tuple[tuple[int, int], ...] = ()
    # "<document title> > <heading path>": what the chunk belongs to, so that a question naming the document
    # ("the 2024 policy") finds it. Its vector is added to each window's (chunking.context_weight) and the
    # keyword index reads it with the text; never part of ``text`` or the spans. Empty for chunks ingested
    # without it (chunking.window_context off, or an index written before it existed).
    context: str = ""
    # What clients and models are shown for the document: its path relative to what was ingested (an upload's
    # sanitised original name); empty for documents ingested before names were stored (see display_name).
    name: str = ""

    @property
    def display_name(self) -> str:
        return self.name or document_name(self.source)

    def embedded_texts(self) -> list[str]:
        """The texts whose vectors stand for this chunk in the index, in window order (each vector with
        ``context``'s mixed in)."""
        if not self.windows:
            return [self.text]
        return [self.text[start - self.start : end - self.start] for start, end in self.windows]


@dataclass(frozen=True)
class Passage:
    """A chunk returned for a query, with the fused score and each retriever's own score."""

    chunk: Chunk
    score: float
    scores: dict[str, float] = field(default_factory=dict)  # e.g. {"dense": 0.71, "keyword": 12.3}


@dataclass(frozen=True)
class DocumentRecord:
    """One ingested document of a tenant."""

    document_id: str
    tenant: str
    source: str
    pages: int
    chunk_count: int
    size_bytes: int
    ingested_at: str  # ISO 8601, UTC
    name: str = ""  # as Chunk.name: relative to what was ingested; "" = the file name

    @property
    def display_name(self) -> str:
        return self.name or document_name(self.source)
