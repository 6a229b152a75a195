"""POST /v1/chat/completions: OpenAI-compatible chat answered from the tenant's passages, with citations."""

import asyncio
import contextlib
from contextlib import AsyncExitStack

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.deps import CurrentTenant, ReadyServices
from server.schemas import ChatRequest, ChatResponse, ErrorResponse

router = APIRouter(tags=["chat"])

_ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid request or over a limit"},
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "unknown model (code model_not_found)"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    429: {"model": ErrorResponse, "description": "the tenant is over its requests or tokens per minute, or holds its "
          "whole share of slots and queue; see Retry-After"},
    503: {"model": ErrorResponse, "description": "all generation slots and the queue are full; see Retry-After"},
    504: {"model": ErrorResponse, "description": "generation ran past server.request_timeout_s"},
}
_DISCONNECT_POLL_S = 0.2


@router.post(
    "/v1/chat/completions",
    response_model=ChatResponse,
    responses=_ERRORS | {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
    summary="Chat completion with cited passages",
)
async def chat_completions(body: ChatRequest, request: Request, tenant: CurrentTenant, services: ReadyServices):
    """OpenAI's chat completion, plus ``citations`` (passages cited as [n]), ``context`` (retrieved,
    uncited) and ``generator``. With ``stream=true`` the answer arrives as SSE chunks and the final
    chunk carries citations, context, generator and usage, followed by ``data: [DONE]``."""
    chat = services.chat
    slot = AsyncExitStack()
    await slot.enter_async_context(services.queue.slot(tenant.id))  # 429 over the tenant's share, 503 when full
    try:
        prepared = await chat.prepare(body, tenant)
        if not body.stream:
            return await _unless_disconnected(request, chat.complete(prepared))
        stream = await chat.start(prepared)
    except BaseException:
        await slot.aclose()
        raise

    async def events():
        try:
            async for line in chat.stream_events(prepared, stream):
                yield line
        finally:
            await slot.aclose()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(slot.aclose),  # closing twice is harmless
    )


async def _unless_disconnected(request: Request, work):
    """Await ``work``, cancelling it (and so generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    return task.result()
