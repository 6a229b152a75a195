"""POST /v1/chat/completions and /v1/completions: OpenAI-compatible chat (and the legacy text completion,
answered as one user turn) from the tenant's passages, with citations."""

import asyncio
import contextlib
from contextlib import AsyncExitStack

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.deps import CurrentTenant, ReadyServices
from server.errors import RequestTimeout
from server.schemas import ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, ErrorResponse
from server.text_completions import as_chat_request

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
# Both endpoints answer JSON, or SSE chunks when stream=true, and fail alike.
_RESPONSES = _ERRORS | {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}}
_DISCONNECT_POLL_S = 0.2


@router.post(
    "/v1/chat/completions",
    response_model=ChatResponse,
    responses=_RESPONSES,
    summary="Chat completion with cited passages",
)
async def chat_completions(body: ChatRequest, request: Request, tenant: CurrentTenant, services: ReadyServices):
    """OpenAI's chat completion, plus ``citations`` (passages cited as [n]), ``context`` (retrieved,
    uncited) and ``generator``. With ``stream=true`` the answer arrives as SSE chunks and the final
    chunk carries citations, context, generator and usage, followed by ``data: [DONE]``."""
    return await _answer(body, request, tenant, services, kind="chat")


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=_RESPONSES,
    summary="Text completion with cited passages (the prompt is answered as one user turn)",
)
async def completions(body: CompletionRequest, request: Request, tenant: CurrentTenant, services: ReadyServices):
    """OpenAI's legacy completion for clients that call it (LlamaIndex's OpenAILike without is_chat_model):
    ``prompt`` is answered like a chat's user message, with the same retrieval, ``citations`` and ``context``."""
    return await _answer(as_chat_request(body), request, tenant, services, kind="text")


async def _answer(body: ChatRequest, request: Request, tenant, services, *, kind: str):
    chat = services.chat
    # request_timeout_s counts from arrival: a request that waited its whole time in the queue gets its 504
    # without being run for a client that has most likely given up.
    deadline = asyncio.get_running_loop().time() + services.settings.server.request_timeout_s
    slot = AsyncExitStack()

    async def admit_and_run():
        try:
            async with asyncio.timeout_at(deadline):
                await slot.enter_async_context(services.queue.slot(tenant.id))  # 429 over the tenant's share, 503 full
        except TimeoutError:
            raise RequestTimeout("chat request waited for a free slot past server.request_timeout_s") from None
        prepared = await chat.prepare(body, tenant, kind=kind, deadline=deadline)
        if not body.stream:
            return prepared, await chat.complete(prepared)
        return prepared, await chat.start(prepared)

    # Watched from arrival on: a client that leaves while its request is queued or retrieving frees its place
    # at once, instead of being retrieved for and generated when its turn comes.
    try:
        ran = await _unless_disconnected(request, admit_and_run())
    except BaseException:
        await slot.aclose()
        raise
    if isinstance(ran, Response) or not body.stream:
        await slot.aclose()
        return ran if isinstance(ran, Response) else ran[1]
    prepared, stream = ran

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
    """Await ``work``, cancelling it (and so generation, or the wait for a slot) if the client disconnects first."""
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
