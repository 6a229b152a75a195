"""Optional cross-encoder reranking of retrieved passages (sentence-transformers ``CrossEncoder``)."""

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from core.settings import RetrievalSettings
from core.records import Passage

log = logging.getLogger(__name__)


class Reranker(Protocol):
    def rerank(self, query: str, passages: Sequence[Passage]) -> list[Passage]:
        """The same passages re-scored for ``query``, best first."""


class CrossEncoderReranker:
    """Scores (query, passage) pairs jointly; slower than the retrievers, so it only sees their candidates."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def load(cls, name: str, *, device: str | None = None) -> "CrossEncoderReranker":
        from sentence_transformers import CrossEncoder

        return cls(CrossEncoder(name, device=device))

    def rerank(self, query: str, passages: Sequence[Passage]) -> list[Passage]:
        if not passages:
            return []
        raw = self.model.predict([(query, p.chunk.text) for p in passages], show_progress_bar=False)
        rescored = [
            replace(p, score=float(s), scores={**p.scores, "rerank": float(s)}) for p, s in zip(passages, raw)
        ]
        return sorted(rescored, key=lambda p: -p.score)


def load_reranker(settings: RetrievalSettings, *, device: str | None = None) -> CrossEncoderReranker | None:
    """The configured reranker, or None when none is configured or it cannot be loaded (logged, not raised)."""
    if not settings.reranker:
        return None
    try:
        reranker = CrossEncoderReranker.load(settings.reranker, device=device)
    except Exception as error:  # OSError, hub errors, bad configs: reranking is an optional extra
        log.warning("reranker %r unavailable, results are not reranked: %s", settings.reranker, error)
        return None
    log.info("reranker %s loaded", settings.reranker)
    return reranker
