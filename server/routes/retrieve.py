"""POST /v1/retrieve: the passages a query finds in the tenant's index, without generation."""

import time
from functools import partial

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.deps import CurrentTenant, ReadyServices
from server.errors import InvalidRequest
from server.schemas import ErrorResponse, PassageOut, RetrieveRequest, RetrieveResponse

router = APIRouter(tags=["retrieval"])


@router.post(
    "/v1/retrieve",
    response_model=RetrieveResponse,
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="Search the tenant's passages",
)
async def retrieve(body: RetrieveRequest, tenant: CurrentTenant, services: ReadyServices) -> RetrieveResponse:
    """404 when the tenant has nothing indexed or ``sources`` names no document: an empty list would read as
    "nothing relevant"."""
    limit = services.settings.server.max_k
    if body.k is not None and body.k > limit:
        raise InvalidRequest(f"k={body.k} is over the limit of {limit}", param="k")
    started = time.perf_counter()
    passages = await run_in_threadpool(
        partial(services.retrieval.retrieve, tenant.id, body.query, k=body.k, sources=body.sources, mode=body.mode,
                require_index=True)
    )
    elapsed = time.perf_counter() - started
    services.metrics.retrieval.labels(tenant.id).observe(elapsed)
    return RetrieveResponse(data=[PassageOut.from_passage(p) for p in passages], retrieval_ms=elapsed * 1000)
