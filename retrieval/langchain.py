"""LangChain adapter: a ``BaseRetriever`` over one tenant, returning Documents with lorag's citation metadata."""

from collections.abc import Sequence

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from retrieval.service import RetrievalService
from core.records import Passage


class LoragRetriever(BaseRetriever):
    """``LoragRetriever(service=RetrievalService(settings), tenant="acme", k=5).invoke("question")``.

    Raises (from ``invoke``): NoIndex for a tenant with nothing indexed, UnknownSources for a ``sources``
    filter that names no document.
    """

    service: RetrievalService
    tenant: str
    k: int | None = None
    mode: str | None = None
    sources: Sequence[str] | None = None

    model_config = {"arbitrary_types_allowed": True}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        # require_index: an unknown tenant or an empty index is an error, not a silent "no documents".
        passages = self.service.retrieve(
            self.tenant, query, k=self.k, sources=self.sources, mode=self.mode, require_index=True
        )
        return [passage_document(p) for p in passages]


def passage_document(passage: Passage) -> Document:
    chunk = passage.chunk
    return Document(
        id=chunk.id,
        page_content=chunk.text,
        metadata={
            "id": chunk.id,
            "tenant": chunk.tenant,
            "document_id": chunk.document_id,
            "source": chunk.source,
            "page": chunk.page,
            "start": chunk.start,
            "end": chunk.end,
            "heading_path": list(chunk.heading_path),
            "score": passage.score,
            "scores": dict(passage.scores),
        },
    )
