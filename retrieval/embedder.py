"""Sentence-transformers embedder shared by ingest (documents) and retrieval (queries)."""

import logging
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from retrieval.errors import LoragError
from retrieval.settings import EmbeddingSettings

log = logging.getLogger(__name__)


class Embedder:
    """Turns texts into L2-normalised float32 vectors, so inner product equals cosine similarity."""

    def __init__(self, settings: EmbeddingSettings):
        self.settings = settings
        self.name = settings.model

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(self.name, device=self.settings.device)
        except Exception as error:  # OSError, ValueError, HF hub errors: all mean "cannot load"
            raise LoragError(
                f"cannot load embedding model {self.name!r}: {error}",
                hint="Set embedding.model (LORAG_EMBEDDING__MODEL) to a sentence-transformers name or local path",
            ) from error
        model.max_seq_length = min(self.settings.max_seq_length, model.max_seq_length or 10**9)
        log.info("embedding model %s loaded (dimension %d)", self.name, self.dimension_of(model))
        return model

    @staticmethod
    def dimension_of(model) -> int:
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @cached_property
    def dimension(self) -> int:
        return self.dimension_of(self.model)

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def tokenizer(self):
        """The embedder's own tokenizer: chunk sizes are measured in its tokens."""
        return self.model.tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def embed_documents(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Embed ``texts``; returns ``(len(texts), dimension)`` float32, rows L2-normalised."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size or self.settings.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query; returns ``(dimension,)`` float32, L2-normalised."""
        return self.embed_documents([text])[0]
