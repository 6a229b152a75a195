"""Documents from the browser: upload (saved under the tenant's uploads dir, then ingested), delete, and the
original file of an indexed document (only the tenant's own records; 404 for anyone else's).

The work is server.uploads.DocumentUploads' (``services.uploads``); these routes parse, authorise and shape.
"""

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from core.records import document_name
from server.deps import CurrentTenant, ReadyServices
from server.schemas import DocumentDeleted, ErrorResponse, UploadResult

router = APIRouter(tags=["documents"])
_ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse, "description": "not this tenant's"}}

DocumentId = Annotated[str, PathParam(min_length=1, max_length=200)]


@router.post("/v1/documents", response_model=UploadResult, responses=_ERRORS | {400: {"model": ErrorResponse}})
async def upload_documents(
    tenant: CurrentTenant,
    services: ReadyServices,
    files: Annotated[list[UploadFile], File(description="PDF, Markdown, text or HTML files")],
) -> UploadResult:
    """Save the files under the tenant's uploads dir and ingest them; one outcome per file, in order.

    A file with an unsupported type, over the size limit, empty or unparsable gets its own error; the
    others are still ingested. Re-uploading a name replaces that document."""
    return UploadResult(data=await services.uploads.upload(tenant.id, files))


@router.delete("/v1/documents/{document_id}", response_model=DocumentDeleted, responses=_ERRORS)
async def delete_document(document_id: DocumentId, tenant: CurrentTenant, services: ReadyServices) -> DocumentDeleted:
    """Remove the document from the tenant's index; an uploaded original is deleted too."""
    removed = await services.uploads.delete(tenant.id, document_id)
    return DocumentDeleted(id=document_id, deleted=True, source=document_name(removed.source),
                           upload_removed=removed.upload_removed)


@router.get(
    "/v1/documents/{document_id}/file",
    response_class=FileResponse,
    responses=_ERRORS | {200: {"content": {"application/pdf": {}, "text/plain": {}}, "description": "the file"}},
)
async def document_file(document_id: DocumentId, tenant: CurrentTenant, services: ReadyServices) -> FileResponse:
    """The original file the tenant's document was ingested from (append ``#page=N`` to open a PDF at a page)."""
    original = await services.uploads.original(tenant.id, document_id)
    return FileResponse(
        original.path,
        media_type=original.media_type,
        filename=original.path.name,
        content_disposition_type="inline",
        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
    )
