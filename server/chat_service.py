"""One chat turn: check limits, resolve the model, retrieve, decline or generate, attribute the answer's
sentences to the passages that support them.

The chat route only parses the body and shapes the response; everything it needs is here. Retrieval
runs in a worker thread and generation is awaited, so the event loop never blocks.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from starlette.concurrency import run_in_threadpool

from core.errors import LoragError
from core.records import Passage
from server.catalog import ModelCatalog, public_generator_name
from server.errors import InvalidRequest, RequestTimeout, error_body, lorag_error_body
from core.prompt import ABSTENTION_ANSWER, StreamedMarkup, strip_prompt_markup
from retrieval.conversation import search_query
from server.attribution.attributor import Attribution, Attributor
from server.generation.extractive import ExtractiveGenerator
from server.generation.protocol import GenerationRequest, GenerationStream, PromptInfo, SamplingParams, TextDelta
from server.metrics import Metrics
from server.openai_fields import chat_turns, refuse_unimplemented
from server.sources_markdown import sources_markdown
from server.task_prompts import is_task_prompt
from server.schemas import (
    AttributionOut,
    ChatChoice,
    ChatChoiceMessage,
    ChatRequest,
    ChatResponse,
    ChatUsage,
    CitationOut,
    CompletionChoice,
    CompletionResponse,
    PassageOut,
    SentenceOut,
)
from server.settings import ServerSettings
from server.tenants import Tenant

log = logging.getLogger(__name__)

# What an answer says when the model's draft was unsupported and the passages' own sentences stand in for it.
QUOTE_HEADER = "The generated answer was not supported by the documents; these sentences from them best match the question:"


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
    query: str = ""  # what was searched: the last user turn, with the one before it for a follow-up
    attribute: bool = False  # match the answer's sentences to the passages afterwards
    answerability: float | None = None  # how well the best passage matches the query
    abstained: bool = False  # no passage answers the query: the answer says so without generating
    evidence: dict = field(default_factory=dict)  # chunk id -> the attributor's PassageEvidence, embedded once
    sources_in_content: bool = False  # append the cited sources to the text as Markdown
    logprobs: bool = False
    kind: str = "chat"  # "text": answered through /v1/completions, shaped as a text completion
    deadline: float | None = None  # loop time past which the request is cut off (504); None: request_timeout_s from now


@dataclass
class ChatOutcome:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    citations: list[CitationOut]
    context: list[PassageOut]
    attribution: AttributionOut | None = None
    sources: str = ""  # the Markdown "Sources" list appended to the text, when asked for
    logprobs: dict | None = None  # OpenAI's {"content": [...]} of the generated tokens, when asked for

    @property
    def content(self) -> str:
        return self.text + self.sources


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
        attributor: Attributor | None = None,
        quoter: ExtractiveGenerator | None = None,
        admission=None,
    ):
        self.settings = settings
        self.retrieval = retrieval
        self.generator = generator
        self.catalog = catalog
        self.metrics = metrics
        self.adapters = adapters  # server.hotswap.service.AdapterService: loads the request's adapter version
        self.attributor = attributor  # None: citations come from the model's own [n] markers only
        # quotes the passages when nothing a model wrote is supported (attribution.unsupported = "quote")
        self.quoter = quoter
        self.admission = admission  # server.admission.Admission: counts tokens against tokens per minute

    # -- before generation -----------------------------------------------------------------------
    async def prepare(self, body: ChatRequest, tenant: Tenant, *, kind: str = "chat",
                      deadline: float | None = None) -> PreparedChat:
        """``kind`` "text": a /v1/completions prompt, already turned into one user turn. ``deadline``: loop time
        the whole request must end by (the route counts from arrival, queue included).

        Raises: InvalidRequest (400) over a limit, ModelNotFound (404), LoragError from retrieval."""
        started = time.perf_counter()
        refuse_unimplemented(body, logprobs=getattr(self.generator, "logprobs", False))
        sampling = self._sampling(body)
        choice = self.catalog.resolve(body.model, tenant)
        messages = chat_turns(body.messages)
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        if not last.strip():
            raise InvalidRequest("messages: the conversation needs a non-empty user message", param="messages")
        query = search_query([m.content for m in messages if m.role == "user"])

        passages: list[Passage] = []
        retrieval_s = 0.0
        options = body.retrieval
        housekeeping = self.settings.server.skip_retrieval_for_task_prompts and is_task_prompt(last)
        if not choice.retrieval or housekeeping:
            options = options.model_copy(update={"enabled": False})
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
        wanted = options.attribution if options.attribution is not None else self.settings.attribution.enabled
        attribute = options.enabled and wanted and self.attributor is not None
        answerability, evidence = None, {}
        if attribute and passages:
            evidence = await run_in_threadpool(self.attributor.evidence, passages)
            if self.settings.attribution.abstain_below > 0:
                rarity = await run_in_threadpool(self.retrieval.term_weights, tenant.id, query)
                answerability = await run_in_threadpool(self.attributor.answerability, query, passages,
                                                        evidence=evidence, rarity=rarity)

        request_id = f"{'cmpl' if kind == 'text' else 'chatcmpl'}-{uuid.uuid4().hex}"
        request = GenerationRequest(
            messages=messages, passages=tuple(passages), sampling=sampling, adapter=choice.adapter,
            request_id=request_id,
        )
        return PreparedChat(
            request_id, int(time.time()), body.model, tenant.id, request, list(passages), started, retrieval_s,
            query=query, attribute=attribute, answerability=answerability, evidence=evidence,
            abstained=answerability is not None and answerability < self.settings.attribution.abstain_below,
            sources_in_content=(body.sources_in_content if body.sources_in_content is not None
                                else self.settings.server.sources_in_content),
            logprobs=bool(body.logprobs), kind=kind,
            deadline=deadline,
        )

    def _sampling(self, body: ChatRequest) -> SamplingParams:
        limits = self.settings.server
        if len(body.messages) > limits.max_messages:
            raise InvalidRequest(
                f"messages: {len(body.messages)} messages is over the limit of {limits.max_messages}",
                param="messages",
            )
        for index, message in enumerate(body.messages):
            if len(message.content or "") > limits.max_message_chars:
                raise InvalidRequest(
                    f"messages.{index}.content: {len(message.content)} characters is over the limit of "
                    f"{limits.max_message_chars}",
                    param=f"messages.{index}.content",
                )
        max_tokens = body.max_tokens or body.max_completion_tokens or limits.default_max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is over the limit of {limits.max_tokens_limit}", param="max_tokens"
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise InvalidRequest(f"stop: {len(stop)} sequences given, at most 4 are allowed", param="stop")
        penalty = body.repetition_penalty or self.settings.generation.repetition_penalty
        temperature = body.temperature if body.temperature is not None else self.settings.generation.temperature
        return SamplingParams(
            logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
            max_tokens=max_tokens, temperature=temperature, top_p=body.top_p, stop=stop, seed=body.seed,
            repetition_penalty=penalty,
        )

    # -- generation ------------------------------------------------------------------------------
    async def complete(self, prepared: PreparedChat) -> ChatResponse:
        """Generate the whole answer. Raises: RequestTimeout (504) past server.request_timeout_s."""
        deadline = self._deadline(prepared)
        stream = await self._start(prepared, deadline)
        parts: list[str] = []
        logprobs: list[dict] = []
        tokens = 0
        finish_reason = None
        first = True
        try:
            async for delta in _until(stream.deltas, deadline, prepared):
                if first and delta.text:
                    self._first_token(prepared)
                    first = False
                parts.append(delta.text)
                logprobs += [entry.as_openai() for entry in delta.logprobs]
                tokens += delta.tokens
                finish_reason = delta.finish_reason or finish_reason
        finally:
            await _close(stream.deltas)
        outcome = await self._finish(prepared, stream, "".join(parts), tokens, finish_reason)
        if prepared.logprobs:
            outcome.logprobs = {"content": logprobs}
        return self.response(prepared, outcome)

    async def stream_events(self, prepared: PreparedChat, stream: GenerationStream) -> AsyncIterator[str]:
        """SSE lines in OpenAI's chunk format; the last chunk carries citations, context and usage.

        A client that goes away cancels this iterator, which closes the generator's stream.
        """
        deadline = self._deadline(prepared)
        text_completion = prepared.kind == "text"
        choice = _text_choice if text_completion else _choice
        base = {"id": prepared.id, "object": "text_completion" if text_completion else "chat.completion.chunk",
                "created": prepared.created, "model": prepared.model}
        parts: list[str] = []
        tokens = 0
        finish_reason = None
        markup = StreamedMarkup()  # a <document ...> tag copied from the prompt is never streamed
        # Logprobs of tokens whose text is held back (or is none: part of a character), sent with the next text
        # shown; a dropped tag's tokens keep theirs there, so the streamed logprobs still cover every token.
        pending: list = []

        def piece(text: str) -> str:
            chunk = choice({"content": text})
            if prepared.logprobs:  # the tokens behind this piece of text, as OpenAI streams them
                chunk["logprobs"] = {"content": [entry.as_openai() for entry in pending]}
            pending.clear()
            return _sse(base | {"choices": [chunk]})

        try:
            if not text_completion:
                yield _sse(base | {"choices": [_choice({"role": "assistant", "content": ""})]})
            async for delta in _until(stream.deltas, deadline, prepared):
                if delta.text or delta.logprobs:
                    if not parts:
                        self._first_token(prepared)
                    parts.append(delta.text)
                    if prepared.logprobs:
                        pending += delta.logprobs
                    if shown := markup.feed(delta.text):
                        yield piece(shown)
                tokens += delta.tokens
                finish_reason = delta.finish_reason or finish_reason
            if (rest := markup.end()) or pending:
                yield piece(rest)
            outcome = await self._finish(prepared, stream, "".join(parts), tokens, finish_reason)
            if outcome.sources:
                yield _sse(base | {"choices": [choice({"content": outcome.sources})]})
            final = base | {
                "choices": [choice({}, outcome.finish_reason or "stop")],
                "usage": _usage(outcome).model_dump(),
                "citations": [c.model_dump() for c in outcome.citations],
                "context": [p.model_dump() for p in outcome.context],
                "generator": public_generator_name(self.generator.name),
                # the streamed text with its markers fixed: clients render this once the stream ends
                "attribution": outcome.attribution.model_dump() if outcome.attribution else None,
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
        deadline = self._deadline(prepared)
        return await self._start(prepared, deadline)

    async def _start(self, prepared: PreparedChat, deadline: float) -> GenerationStream:
        if prepared.abstained:
            return _abstention(prepared)
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

    def _deadline(self, prepared: PreparedChat) -> float:
        if prepared.deadline is not None:
            return prepared.deadline
        return asyncio.get_running_loop().time() + self.settings.server.request_timeout_s

    def _first_token(self, prepared: PreparedChat) -> None:
        self.metrics.time_to_first_token.labels(prepared.tenant).observe(time.perf_counter() - prepared.started)

    async def _finish(self, prepared, stream: GenerationStream, text: str, tokens: int, finish_reason) -> ChatOutcome:
        used = list(stream.prompt.passages_used)  # [n] numbers these, 1-based
        text = strip_prompt_markup(text)  # a <document ...> tag the model copied from its prompt
        attribution = None
        if prepared.abstained:
            attribution = AttributionOut(text=text, sentences=[], supported=0, unsupported=0, abstained=True,
                                         answerability=prepared.answerability)
        elif prepared.attribute and used and text.strip():
            attribution, text, numbers = await run_in_threadpool(
                prove, self.attributor, self.quoter, self.settings.attribution.unsupported, text, used,
                question=prepared.query, evidence=prepared.evidence, answerability=prepared.answerability)
        if attribution is None or prepared.abstained:
            from server.citations import extract_citations

            numbers = [c.number for c in extract_citations(text, used)]
        cited: list[CitationOut] = []
        for number in numbers:
            sentences = [i for i, s in enumerate(attribution.sentences) if number in s.citations] if attribution else []
            passage = PassageOut.from_passage(used[number - 1]).model_dump()
            cited.append(CitationOut(number=number, sentences=sentences, **passage))
        cited_ids = {citation.id for citation in cited}
        context = [PassageOut.from_passage(p) for p in prepared.retrieved if p.chunk.id not in cited_ids]
        generator = self.generator.name
        self.metrics.tokens.labels(prepared.tenant, generator).inc(tokens)
        self.metrics.prompt_tokens.labels(prepared.tenant, generator).inc(stream.prompt.prompt_tokens)
        sources = sources_markdown(cited, base_url=self.settings.server.public_url) if prepared.sources_in_content else ""
        if self.admission is not None:
            self.admission.charge_tokens(prepared.tenant, stream.prompt.prompt_tokens + tokens)
        return ChatOutcome(text, finish_reason or "stop", stream.prompt.prompt_tokens, tokens, cited, context,
                           attribution, sources=sources)

    def response(self, prepared: PreparedChat, outcome: ChatOutcome) -> ChatResponse | CompletionResponse:
        if prepared.kind == "text":
            return CompletionResponse(
                id=prepared.id, created=prepared.created, model=prepared.model,
                choices=[CompletionChoice(text=outcome.content, finish_reason=outcome.finish_reason)],
                usage=_usage(outcome), citations=outcome.citations, context=outcome.context,
                generator=public_generator_name(self.generator.name), attribution=outcome.attribution,
            )
        return ChatResponse(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model,
            choices=[ChatChoice(message=ChatChoiceMessage(content=outcome.content), finish_reason=outcome.finish_reason,
                                logprobs=outcome.logprobs)],
            usage=_usage(outcome),
            citations=outcome.citations,
            context=outcome.context,
            generator=public_generator_name(self.generator.name),
            attribution=outcome.attribution,
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


def _abstention(prepared: PreparedChat) -> GenerationStream:
    """The answer when no retrieved passage answers the question: said plainly, nothing generated."""

    async def deltas():
        yield TextDelta(ABSTENTION_ANSWER, tokens=0, finish_reason="stop")

    return GenerationStream(prompt=PromptInfo(prompt_tokens=0, passages_used=tuple(prepared.retrieved)),
                            deltas=deltas())


def prove(attributor: Attributor, quoter: ExtractiveGenerator | None, unsupported: str, text: str,
          used: list[Passage], *, question: str, evidence: dict, answerability: float | None,
          ) -> tuple[AttributionOut, str, list[int]]:
    """The answer's proof after generation: (attribution, final text, cited passage numbers). A plain function
    so that benchmarks/answer_proof_sweep.py replays saved drafts through exactly what the server does."""
    proof = attributor.attribute(text, used, question=question, evidence=evidence)
    attribution = _attribution_out(proof, answerability)
    claims = [s for s in proof.sentences if s.claim]
    if any(s.supported for s in claims) or unsupported == "flag":
        return attribution, proof.text, proof.cited
    # Nothing the model said stands on a passage, or it said nothing checkable (a bare "No." carries no proof).
    # Quote the passages' best sentences when one supports the question ("quote"), else say the documents do
    # not; the draft is kept either way.
    draft = proof.text
    quoted = quoter.quote(question, used) if unsupported == "quote" and quoter is not None else None
    if quoted:
        proof = attributor.attribute(QUOTE_HEADER + "".join(quoted), used, question=question, evidence=evidence)
        attribution = _attribution_out(proof, answerability).model_copy(update={"draft": draft, "quoted": True})
        return attribution, proof.text, proof.cited
    attribution = attribution.model_copy(update={"abstained": True, "draft": draft, "text": ABSTENTION_ANSWER})
    return attribution, ABSTENTION_ANSWER, []


def _attribution_out(proof: Attribution, answerability: float | None) -> AttributionOut:
    sentences = [SentenceOut(start=s.start, end=s.end, text=s.text, supported=s.supported, claim=s.claim,
                             citations=list(s.citations), score=round(s.score, 4)) for s in proof.sentences]
    return AttributionOut(
        text=proof.text,
        sentences=sentences,
        supported=sum(s.supported for s in sentences),
        unsupported=sum(s.claim and not s.supported for s in sentences),
        answerability=None if answerability is None else round(answerability, 4),
    )


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


def _text_choice(delta: dict, finish_reason: str | None = None) -> dict:
    """/v1/completions' streamed choice: the new text, not a message delta."""
    return {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

