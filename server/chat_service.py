"""One chat turn: check limits, resolve the model, retrieve, generate, resolve ``[n]`` citations.

The chat route only parses the body and shapes the response; everything it needs is here. Retrieval
runs in a worker thread and generation is awaited, so the event loop never blocks.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.concurrency import run_in_threadpool

from core.errors import LoragError
from core.records import Passage
from server.catalog import ModelCatalog
from server.errors import InvalidRequest, RequestTimeout, error_body, lorag_error_body
from core.prompt import ChatMessage
from server.generation.protocol import GenerationRequest, GenerationStream, SamplingParams
from server.metrics import Metrics
from server.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatRequest,
    ChatResponse,
    ChatUsage,
    CitationOut,
    PassageOut,
)
from server.settings import ServerSettings
from server.tenants import Tenant

log = logging.getLogger(__name__)


@dataclass
class PreparedChat:
    """A validated request with its passages retrieved, ready for the generator."""

    id: str
    created: int
    model: str
    tenant: str
    request: GenerationRequest
    retrieved: list[Passage]
    started: float  # perf_counter at arrival, for time-to-first-token
    retrieval_s: float


@dataclass
class ChatOutcome:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    citations: list[CitationOut]
    context: list[PassageOut]


class ChatService:
    def __init__(
        self,
        settings: ServerSettings,
        *,
        retrieval,
        generator,
        catalog: ModelCatalog,
        metrics: Metrics,
        adapters=None,
    ):
        self.settings = settings
        self.retrieval = retrieval
        self.generator = generator
        self.catalog = catalog
        self.metrics = metrics
        self.adapters = adapters  # server.hotswap.service.AdapterService: loads the request's adapter version

    # -- before generation -----------------------------------------------------------------------
    async def prepare(self, body: ChatRequest, tenant: Tenant) -> PreparedChat:
        """Raises: InvalidRequest (400) over a limit, ModelNotFound (404), LoragError from retrieval."""
        started = time.perf_counter()
        sampling = self._sampling(body)
        choice = self.catalog.resolve(body.model, tenant)
        messages = tuple(ChatMessage(role=m.role, content=m.content) for m in body.messages)
        query = next((m.content for m in reversed(messages) if m.role == "user"), "")
        if not query.strip():
            raise InvalidRequest("messages: the conversation needs a non-empty user message", param="messages")

        passages: list[Passage] = []
        retrieval_s = 0.0
        options = body.retrieval
        if options.enabled:
            if options.k is not None and options.k > self.settings.server.max_k:
                raise InvalidRequest(
                    f"retrieval.k={options.k} is over the limit of {self.settings.server.max_k}", param="retrieval.k"
                )
            t0 = time.perf_counter()
            passages = await run_in_threadpool(
                self.retrieval.retrieve, tenant.id, query, k=options.k, sources=options.sources, mode=options.mode
            )
            retrieval_s = time.perf_counter() - t0
            self.metrics.retrieval.labels(tenant.id).observe(retrieval_s)

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        request = GenerationRequest(
            messages=messages, passages=tuple(passages), sampling=sampling, adapter=choice.adapter,
            request_id=request_id,
        )
        return PreparedChat(
            request_id, int(time.time()), body.model, tenant.id, request, list(passages), started, retrieval_s
        )

    def _sampling(self, body: ChatRequest) -> SamplingParams:
        limits = self.settings.server
        if len(body.messages) > limits.max_messages:
            raise InvalidRequest(
                f"messages: {len(body.messages)} messages is over the limit of {limits.max_messages}",
                param="messages",
            )
        for index, message in enumerate(body.messages):
            if len(message.content) > limits.max_message_chars:
                raise InvalidRequest(
                    f"messages.{index}.content: {len(message.content)} characters is over the limit of "
                    f"{limits.max_message_chars}",
                    param=f"messages.{index}.content",
                )
        max_tokens = body.max_tokens or body.max_completion_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is over the limit of {limits.max_tokens_limit}", param="max_tokens"
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise InvalidRequest(f"stop: {len(stop)} sequences given, at most 4 are allowed", param="stop")
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed
        )

    # -- generation ------------------------------------------------------------------------------
    async def complete(self, prepared: PreparedChat) -> ChatResponse:
        """Generate the whole answer. Raises: RequestTimeout (504) past server.request_timeout_s."""
        deadline = asyncio.get_running_loop().time() + self.settings.server.request_timeout_s
        stream = await self._start(prepared, deadline)
        parts: list[str] = []
        tokens = 0
        finish_reason = None
        first = True
        try:
            async for delta in _until(stream.deltas, deadline, prepared):
                if first and delta.text:
                    self._first_token(prepared)
                    first = False
                parts.append(delta.text)
                tokens += delta.tokens
                finish_reason = delta.finish_reason or finish_reason
        finally:
            await _close(stream.deltas)
        outcome = self._finish(prepared, stream, "".join(parts), tokens, finish_reason)
        return self.response(prepared, outcome)

    async def stream_events(self, prepared: PreparedChat, stream: GenerationStream) -> AsyncIterator[str]:
        """SSE lines in OpenAI's chunk format; the last chunk carries citations, context and usage.

        A client that goes away cancels this iterator, which closes the generator's stream.
        """
        deadline = asyncio.get_running_loop().time() + self.settings.server.request_timeout_s
        base = {"id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
                "model": prepared.model}
        parts: list[str] = []
        tokens = 0
        finish_reason = None
        try:
            yield _sse(base | {"choices": [_choice({"role": "assistant", "content": ""})]})
            async for delta in _until(stream.deltas, deadline, prepared):
                if delta.text:
                    if not parts:
                        self._first_token(prepared)
                    parts.append(delta.text)
                    yield _sse(base | {"choices": [_choice({"content": delta.text})]})
                tokens += delta.tokens
                finish_reason = delta.finish_reason or finish_reason
            outcome = self._finish(prepared, stream, "".join(parts), tokens, finish_reason)
            final = base | {
                "choices": [_choice({}, outcome.finish_reason or "stop")],
                "usage": _usage(outcome).model_dump(),
                "citations": [c.model_dump() for c in outcome.citations],
                "context": [p.model_dump() for p in outcome.context],
                "generator": self.generator.name,
            }
            yield _sse(final)
        except LoragError as error:  # headers are sent: report in-band, as OpenAI does
            status, body = lorag_error_body(error)
            yield _sse(body)
        except Exception:
            log.exception("chat stream %s failed", prepared.id)
            yield _sse(error_body(500, "internal server error; the server log has the details"))
        finally:
            await _close(stream.deltas)
        yield "data: [DONE]\n\n"

    async def start(self, prepared: PreparedChat) -> GenerationStream:
        deadline = asyncio.get_running_loop().time() + self.settings.server.request_timeout_s
        return await self._start(prepared, deadline)

    async def _start(self, prepared: PreparedChat, deadline: float) -> GenerationStream:
        lease = None
        try:
            async with asyncio.timeout_at(deadline):
                request = prepared.request
                if request.adapter is not None and self.adapters is not None and self.adapters.host is not None:
                    # The lease pins the adapter version this request runs on until its stream ends.
                    lease = await self.adapters.acquire(prepared.tenant, request.adapter)
                    request = replace(request, adapter=lease.key)
                stream = await self.generator.start(request)
        except TimeoutError:
            if lease is not None:
                lease.release()
            raise _timeout(prepared) from None
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if lease is not None:
            stream.deltas = lease.hold(stream.deltas)
        return stream

    def _first_token(self, prepared: PreparedChat) -> None:
        self.metrics.time_to_first_token.labels(prepared.tenant).observe(time.perf_counter() - prepared.started)

    def _finish(self, prepared, stream: GenerationStream, text: str, tokens: int, finish_reason) -> ChatOutcome:
        from server.citations import extract_citations

        used = list(stream.prompt.passages_used)
        cited: list[CitationOut] = []
        cited_ids: set[str] = set()
        for citation in extract_citations(text, used):
            # [n] numbers the passages the generator put in its prompt, 1-based.
            if not 1 <= citation.number <= len(used):
                continue
            passage = used[citation.number - 1]
            cited.append(CitationOut(number=citation.number, **PassageOut.from_passage(passage).model_dump()))
            cited_ids.add(passage.chunk.id)
        context = [PassageOut.from_passage(p) for p in prepared.retrieved if p.chunk.id not in cited_ids]
        generator = self.generator.name
        self.metrics.tokens.labels(prepared.tenant, generator).inc(tokens)
        self.metrics.prompt_tokens.labels(prepared.tenant, generator).inc(stream.prompt.prompt_tokens)
        return ChatOutcome(text, finish_reason or "stop", stream.prompt.prompt_tokens, tokens, cited, context)

    def response(self, prepared: PreparedChat, outcome: ChatOutcome) -> ChatResponse:
        return ChatResponse(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model,
            choices=[ChatChoice(message=ChatChoiceMessage(content=outcome.text), finish_reason=outcome.finish_reason)],
            usage=_usage(outcome),
            citations=outcome.citations,
            context=outcome.context,
            generator=self.generator.name,
        )


async def _until(deltas, deadline: float, prepared: PreparedChat):
    """The generator's deltas, cut off with RequestTimeout at ``deadline`` (loop time)."""
    iterator = deltas.__aiter__()
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                delta = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _timeout(prepared) from None
        yield delta


async def _close(deltas) -> None:
    # Closing the generator's iterator is how generation is cancelled (see server.generation.protocol).
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # the answer (or the error) is already decided; never mask it
            log.debug("closing a generation stream failed", exc_info=True)


def _timeout(prepared: PreparedChat) -> RequestTimeout:
    return RequestTimeout(f"chat request {prepared.id} ran past server.request_timeout_s")


def _usage(outcome: ChatOutcome) -> ChatUsage:
    return ChatUsage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
    )


def _choice(delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

