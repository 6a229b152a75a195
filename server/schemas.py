"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI defines the shape)."""

from typing import Literal

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_serializer

from core.records import Chunk, DocumentRecord, Passage

RetrievalMode = Literal["hybrid", "dense", "keyword"]


# -- shared shapes -------------------------------------------------------------------------------
class PassageOut(BaseModel):
    """A stored chunk: where it comes from (source, page, character span) and its text."""

    id: str
    document_id: str
    source: str
    page: int = Field(description="1-based page number")
    start: int = Field(description="character offset of the passage in the page's text")
    end: int
    heading_path: list[str] = []
    text: str
    score: float | None = Field(None, description="fused retrieval score, when the passage was retrieved")
    scores: dict[str, float] = Field(default_factory=dict, description="each retriever's own score")
    url: str = Field(description="where to fetch this passage in its document context")

    @classmethod
    def from_chunk(cls, chunk: Chunk, *, score: float | None = None, scores: dict | None = None) -> "PassageOut":
        return cls(
            id=chunk.id,
            document_id=chunk.document_id,
            source=chunk.display_name,
            page=chunk.page,
            start=chunk.start,
            end=chunk.end,
            heading_path=list(chunk.heading_path),
            text=chunk.text,
            score=score,
            scores=scores or {},
            url=f"/v1/passages/{chunk.id}",
        )

    @classmethod
    def from_passage(cls, passage: Passage) -> "PassageOut":
        return cls.from_chunk(passage.chunk, score=passage.score, scores=passage.scores)


class CitationOut(PassageOut):
    """A passage the answer cites as ``[number]``."""

    number: int = Field(description="the [n] used in the answer text")
    sentences: list[int] = Field(default_factory=list,
                                 description="indexes into attribution.sentences of the sentences this passage supports")


class SentenceOut(BaseModel):
    """One sentence of the answer and the passages that support it."""

    start: int = Field(description="character offset of the sentence in the answer text")
    end: int
    text: str = Field(description="the sentence without its [n] markers")
    supported: bool = Field(description="a retrieved passage supports it")
    claim: bool = Field(description="false for sentences too short to check ('Yes.'): neither supported nor not")
    citations: list[int] = Field(description="the [n] of the passages that support it, best first")
    score: float = Field(description="support probability of the best passage (0..1)")


class AttributionOut(BaseModel):
    """lorag extension: the answer's proof, sentence by sentence."""

    text: str = Field("", description="the answer with its [n] markers kept, moved, added or dropped to match the "
                      "passages; equals choices[0].message.content, and is how a stream's final text reads")
    sentences: list[SentenceOut] = Field(description="the sentences of ``text`` in order (of ``draft`` when the answer "
                                         "was declined after generation)")
    supported: int = Field(description="sentences a passage supports")
    unsupported: int = Field(description="claims no retrieved passage supports")
    abstained: bool = Field(False, description="no passage answered the question, so the answer says so")
    draft: str | None = Field(None, description="when the answer was declined or quoted after generation: what the "
                              "model wrote, none of which a retrieved passage supports")
    answerability: float | None = Field(None, description="how well the best passage matches the question (0..1)")
    quoted: bool = Field(False, description="nothing the model wrote was supported, so the answer quotes the passages' "
                         "sentences that best match the question instead (the model's text is in ``draft``)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- OpenAI fields lorag parses only to refuse them ------------------------------------------------
# They are parsed loosely so that server.openai_fields can refuse each by name with a message that says what to do
# (400, param). The OpenAPI document shows what is accepted, so that the document and the server agree.
_NULL = {"type": "null"}
Unsupported = Annotated[dict | None, WithJsonSchema(_NULL)]  # any value is refused
NoTools = Annotated[list[dict] | None, WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, _NULL]})]
NoToolChoice = Annotated[str | dict | None, WithJsonSchema({"anyOf": [{"enum": ["none", "auto"]}, _NULL]})]
NoBias = Annotated[dict[str, float] | None, WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]})]
NoPenalty = Annotated[float | None, Field(ge=-2.0, le=2.0), WithJsonSchema({"anyOf": [{"const": 0}, _NULL]})]
OneChoice = Annotated[int | None, Field(ge=1), WithJsonSchema({"anyOf": [{"const": 1}, _NULL]})]
TextFormat = Annotated[dict | None, WithJsonSchema({"anyOf": [
    {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]}, _NULL]})]
TextOnly = Annotated[list[str] | None, WithJsonSchema({"anyOf": [{"type": "array", "items": {"const": "text"}}, _NULL]})]


# -- chat ----------------------------------------------------------------------------------------
class ChatMessageIn(BaseModel):
    # "developer" is OpenAI's newer name for a system turn; "tool"/"function" turns are parsed so that
    # server.openai_fields can refuse them by name instead of failing on their null content.
    role: Annotated[Literal["system", "developer", "user", "assistant", "tool", "function"],
                    WithJsonSchema({"enum": ["system", "developer", "user", "assistant"], "type": "string"})]
    content: str | None = Field(None, description="text, or OpenAI's list of {type: 'text', text} parts (joined)")
    name: str | None = None
    tool_calls: NoTools = None
    function_call: Unsupported = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value):
        # Some clients send content as parts; only text parts mean anything to a text model.
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return "\n".join(texts)
        return value

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, value: str | None) -> str | None:
        # JSON may carry lone surrogates ("\ud800"); tokenizers cannot encode them, so refuse them here.
        if value is None:
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text is not valid Unicode at character {error.start} (a lone surrogate)") from None
        return value


class RetrievalOptions(BaseModel):
    """lorag extension: how to find the passages the answer may cite."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    k: int | None = Field(None, ge=1, description="passages to retrieve; default from settings")
    sources: list[str] | None = Field(None, description="only search documents with these sources")
    mode: RetrievalMode | None = None
    attribution: bool | None = Field(None, description="match answer sentences to supporting passages and decline "
                                     "unanswerable questions; default from attribution.enabled")


class _GenerationRequest(BaseModel):
    """The fields chat and text completions share: model, sampling, streaming, retrieval and citations."""

    model: str = Field(description="the base model's served name, 'lorag', 'base', one of the tenant's adapters, "
                       "or any of these with the suffix '-no-rag' (answer without retrieval)")
    max_tokens: int | None = Field(None, ge=1, description="default: until the model ends its answer or the context "
                                   "is full (server.default_max_tokens caps it when set)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default generation.temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM's extension: > 1 discourages "
                                             "repeating the answer's own tokens; default generation.repetition_penalty")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    seed: int | None = None
    n: OneChoice = Field(None, description="only 1 is supported")
    retrieval: RetrievalOptions = RetrievalOptions()
    sources_in_content: bool | None = Field(None, description="lorag extension: append the cited sources to the "
                                            "answer as a Markdown list; default server.sources_in_content")
    # OpenAI fields lorag does not implement: parsed so server.openai_fields can refuse them by name (400, param).
    logit_bias: NoBias = None
    presence_penalty: NoPenalty = None
    frequency_penalty: NoPenalty = None


class ChatRequest(_GenerationRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "lorag",
                    "messages": [{"role": "user", "content": "How long is the warranty?"}],
                    "max_tokens": 200,
                    "retrieval": {"k": 5},
                }
            ]
        }
    )

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens (newer OpenAI clients)")
    logprobs: bool | None = Field(None, description="the generated tokens' log-probabilities (generative "
                                  "generators; the extractive one refuses)")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI fields lorag does not implement (or not with every generator), refused by name.
    tools: NoTools = None
    tool_choice: NoToolChoice = None
    parallel_tool_calls: bool | None = None
    functions: NoTools = None
    function_call: NoToolChoice = None
    response_format: TextFormat = None
    modalities: TextOnly = None
    audio: Unsupported = None
    prediction: Unsupported = None


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length", "cancelled"] | None
    logprobs: dict | None = Field(None, description="with logprobs=true: {content: [{token, logprob, bytes, "
                                  "top_logprobs}]} of the tokens the model generated (before attribution moves "
                                  "[n] markers), after repetition_penalty and before temperature and top_p")


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    citations: list[CitationOut] = Field(description="passages the answer cites, by [number]")
    context: list[PassageOut] = Field(description="retrieved passages the answer does not cite")
    generator: str = Field(description="what produced the answer, e.g. 'extractive' or 'transformers:<model>'")
    attribution: AttributionOut | None = Field(None, description="per-sentence support; null when retrieval or "
                                               "attribution is off")


# -- text completions (/v1/completions) ----------------------------------------------------------
class CompletionRequest(_GenerationRequest):
    """OpenAI's legacy completion: the prompt is answered as one user turn, with the same retrieval and
    citations as chat (LlamaIndex's OpenAILike calls it unless is_chat_model=True)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "lorag", "prompt": "How long is the warranty?"}]})

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]})] = Field(
        description="text, or a list of one text (token ids and several prompts are refused by name)")
    # fields lorag does not implement, refused by name
    logprobs: Annotated[int | None, Field(ge=0, le=5), WithJsonSchema(_NULL)] = None
    echo: Annotated[bool | None, WithJsonSchema({"anyOf": [{"const": False}, _NULL]})] = None
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [{"const": ""}, _NULL]})] = None
    best_of: OneChoice = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: ChatUsage
    citations: list[CitationOut]
    context: list[PassageOut]
    generator: str
    attribution: AttributionOut | None = None


# -- retrieval and documents ---------------------------------------------------------------------
class RetrieveRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"query": "warranty period", "k": 5, "mode": "hybrid"}]}
    )

    query: str = Field(min_length=1)
    k: int | None = Field(None, ge=1)
    sources: list[str] | None = None
    mode: RetrievalMode | None = None


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[PassageOut]
    retrieval_ms: float


class PassageContext(BaseModel):
    passage: PassageOut
    neighbours: list[PassageOut] = Field(description="surrounding chunks of the same document, reading order")


class NeighboursResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[PassageOut]


class DocumentOut(BaseModel):
    id: str
    source: str
    pages: int
    chunk_count: int
    size_bytes: int
    ingested_at: str

    @classmethod
    def from_record(cls, record: DocumentRecord) -> "DocumentOut":
        return cls(
            id=record.document_id,
            source=record.display_name,
            pages=record.pages,
            chunk_count=record.chunk_count,
            size_bytes=record.size_bytes,
            ingested_at=record.ingested_at,
        )


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentOut]


class DocumentDetail(DocumentOut):
    chunks: list[PassageOut]


class UploadOutcome(BaseModel):
    filename: str  # as the browser sent it
    saved_as: str | None = None  # the sanitized name under the tenant's uploads dir
    status: Literal["added", "updated", "unchanged", "failed", "rejected"]
    reason: str = ""
    document_id: str | None = None
    pages: int = 0
    chunks: int = 0
    warnings: list[str] = []


class UploadResult(BaseModel):
    object: Literal["list"] = "list"
    data: list[UploadOutcome]


class DocumentDeleted(BaseModel):
    id: str
    object: Literal["document.deleted"] = "document.deleted"
    deleted: bool
    source: str
    upload_removed: bool


# -- models and admin ----------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    kind: Literal["base", "alias", "adapter"] = Field(description="lorag extension")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TenantOut(BaseModel):
    id: str
    keys: int = Field(description="number of active API keys")
    default_adapter: str | None
    created_at: str


class TenantRemoved(TenantOut):
    data: Literal["quarantined", "purged", "none"] = Field(
        description="what became of the tenant's data: moved to <data_dir>/quarantine (the default), deleted "
        "(?purge=true), or there was none"
    )


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantOut]


class TenantCreate(BaseModel):
    id: str = Field(description="tenant name: lowercase letters, digits, '-' and '_'")
    default_adapter: str | None = None


class TenantKey(BaseModel):
    tenant: TenantOut
    api_key: str = Field(description="shown only once; store it now")


class RemoteServerStatus(BaseModel):
    """One vLLM server of generation.engine = "remote" (no tenant's adapter names: health needs no key)."""

    server: str
    up: bool | None = Field(None, description="None until lorag has heard from it")
    adapters: int = Field(0, description="lorag adapters loaded on it")
    model: str | None = None


class HealthStatus(BaseModel):
    status: Literal["ok", "starting", "unavailable"]
    generator: str | None = None
    generator_kind: str | None = None
    retrieval: bool = False
    remote: list[RemoteServerStatus] | None = None  # generation.engine = "remote" only

    @model_serializer(mode="wrap")
    def _remote_only_when_remote(self, handler):
        data = handler(self)
        if isinstance(data, dict) and data.get("remote") is None:
            data.pop("remote", None)  # local generators keep the health bodies they always had
        return data
