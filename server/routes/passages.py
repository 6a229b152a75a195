"""Inspecting cited passages in their document context: passages, neighbours, documents."""

from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.deps import CurrentTenant, ReadyServices
from server.schemas import (
    DocumentDetail,
    DocumentList,
    DocumentOut,
    ErrorResponse,
    NeighboursResponse,
    PassageContext,
    PassageOut,
)

router = APIRouter(tags=["passages"])
_NOT_FOUND = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse, "description": "not this tenant's"}}
_MAX_NEIGHBOURS = 20

PassageId = Annotated[str, Path(min_length=1, max_length=200, description="a passage (chunk) id from a citation")]


@router.get("/v1/passages/{passage_id}", response_model=PassageContext, responses=_NOT_FOUND)
def get_passage(
    passage_id: PassageId,
    tenant: CurrentTenant,
    services: ReadyServices,
    neighbours: Annotated[int, Query(ge=0, le=_MAX_NEIGHBOURS, description="chunks before and after")] = 0,
) -> PassageContext:
    """One passage; with ``neighbours=N`` also the N chunks before and after it in its document."""
    chunk = services.retrieval.chunk(tenant.id, passage_id)
    around = []
    if neighbours:
        around = services.retrieval.neighbours(tenant.id, passage_id, before=neighbours, after=neighbours)
    return PassageContext(
        passage=PassageOut.from_chunk(chunk),
        neighbours=[PassageOut.from_chunk(c) for c in around if c.id != chunk.id],
    )


@router.get("/v1/passages/{passage_id}/neighbours", response_model=NeighboursResponse, responses=_NOT_FOUND)
def get_neighbours(
    passage_id: PassageId,
    tenant: CurrentTenant,
    services: ReadyServices,
    before: Annotated[int, Query(ge=0, le=_MAX_NEIGHBOURS)] = 1,
    after: Annotated[int, Query(ge=0, le=_MAX_NEIGHBOURS)] = 1,
) -> NeighboursResponse:
    """The passage with ``before`` chunks ahead of it and ``after`` behind it, in reading order."""
    chunks = services.retrieval.neighbours(tenant.id, passage_id, before=before, after=after)
    return NeighboursResponse(data=[PassageOut.from_chunk(c) for c in chunks])


@router.get("/v1/documents", response_model=DocumentList, responses=_NOT_FOUND, tags=["documents"])
def list_documents(tenant: CurrentTenant, services: ReadyServices) -> DocumentList:
    return DocumentList(data=[DocumentOut.from_record(r) for r in services.retrieval.documents(tenant.id)])


@router.get("/v1/documents/{document_id}", response_model=DocumentDetail, responses=_NOT_FOUND, tags=["documents"])
def get_document(
    document_id: Annotated[str, Path(min_length=1, max_length=200)],
    tenant: CurrentTenant,
    services: ReadyServices,
) -> DocumentDetail:
    """One document with all its chunks in reading order."""
    record = services.retrieval.document(tenant.id, document_id)
    chunks = services.retrieval.chunks_of(tenant.id, document_id)
    return DocumentDetail(
        **DocumentOut.from_record(record).model_dump(), chunks=[PassageOut.from_chunk(c) for c in chunks]
    )
