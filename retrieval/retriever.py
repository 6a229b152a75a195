"""Hybrid retrieval: dense (FAISS) and keyword (BM25) hits fused into one ranking, optionally reranked.

Relative-score fusion is the default: on COVID-QA and HotpotQA it beat reciprocal-rank fusion on every
metric (benchmarks/retrieval_quality.py; numbers in benchmarks/RESULTS.md, "Retrieval").
"""

import logging
from collections.abc import Hashable, Mapping, Sequence

from retrieval.errors import LoragError
from retrieval.index import TenantIndex
from retrieval.reranker import Reranker
from retrieval.settings import RetrievalSettings
from retrieval.types import Chunk, Passage

log = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "keyword")
FUSIONS = ("relative", "rrf")


def reciprocal_rank_fusion(
    rankings: Mapping[str, Sequence[Hashable]], *, k: int = 60, weights: Mapping[str, float] | None = None
) -> list[tuple[Hashable, float]]:
    """Fuse ranked lists: ``score(d) = sum_r weight_r / (k + rank_r(d))`` with ranks counted from 1.

    Returns ``(item, score)`` best first; ties keep the order in which items were first seen.
    """
    fused: dict[Hashable, float] = {}
    for name, ranking in rankings.items():
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda pair: -pair[1])  # sorted() is stable: first-seen wins ties


def relative_score_fusion(
    scored: Mapping[str, Sequence[tuple[Hashable, float]]], *, weights: Mapping[str, float] | None = None
) -> list[tuple[Hashable, float]]:
    """Fuse scored lists by their min-max normalised scores: ``score(d) = sum_r weight_r * norm_r(d)``.

    Unlike RRF this keeps how far apart the scores are, so a retriever that is sure of one hit (a rare
    exact term in BM25) outweighs one whose candidates all score alike. Items a list lacks count 0 there.
    """
    fused: dict[Hashable, float] = {}
    for name, ranking in scored.items():
        if not ranking:
            continue
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        values = [score for _, score in ranking]
        low, high = min(values), max(values)
        for item, score in ranking:
            normalised = (score - low) / (high - low) if high > low else 1.0
            fused[item] = fused.get(item, 0.0) + weight * normalised
    return sorted(fused.items(), key=lambda pair: -pair[1])


def resolve_mode(mode: str | None, settings: RetrievalSettings) -> str:
    """The retrieval mode for one call: ``mode`` if given, else what ``settings.dense``/``keyword`` enable.

    Raises:
        LoragError: ``mode`` is not one of hybrid, dense, keyword, or settings disable both retrievers.
    """
    if mode is not None:
        if mode not in MODES:
            raise LoragError(f"unknown retrieval mode {mode!r}", hint=f"Use one of {', '.join(MODES)}")
        return mode
    if settings.dense and settings.keyword:
        return "hybrid"
    if settings.dense:
        return "dense"
    if settings.keyword:
        return "keyword"
    raise LoragError(
        "retrieval.dense and retrieval.keyword are both false", hint="Enable at least one retriever in settings"
    )


class HybridRetriever:
    """Answers a query against one tenant's index."""

    def __init__(
        self,
        index: TenantIndex,
        embedder,
        settings: RetrievalSettings,
        *,
        reranker: Reranker | None = None,
        fusion: str = "relative",
        weights: Mapping[str, float] | None = None,
    ):
        if fusion not in FUSIONS:
            raise LoragError(f"unknown retrieval fusion {fusion!r}", hint=f"Use one of {', '.join(FUSIONS)}")
        self.index = index
        self.embedder = embedder
        self.settings = settings
        self.reranker = reranker
        self.fusion = fusion
        self.weights = weights  # per-retriever fusion weights, e.g. {"dense": 1.0, "keyword": 0.5}; None = equal

    def retrieve(
        self, query: str, *, k: int | None = None, sources: Sequence[str] | None = None, mode: str | None = None
    ) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first, optionally only from ``sources``.

        ``Passage.score`` is the fused score (hybrid; also in ``scores["fused"]``), the cosine similarity
        (dense), the BM25 score (keyword) or the reranker's score (``scores["rerank"]``);
        ``Passage.scores`` also holds each retriever's own score (``"dense"``, ``"keyword"``).

        Raises:
            LoragError: empty query, ``k`` outside 1..100, or an unknown ``mode``.
        """
        mode = resolve_mode(mode, self.settings)
        k = self.settings.k if k is None else k
        if not 1 <= k <= 100:
            raise LoragError(f"k={k} is out of range", hint="Ask for 1 to 100 passages")
        if not query or not query.strip():
            raise LoragError("the query is empty", hint="Ask a question with at least one word")
        sources = list(sources) if sources else None
        candidates = max(self.settings.candidates, k)

        hits: dict[str, list[tuple[Chunk, float]]] = {}
        if mode in ("hybrid", "dense"):
            hits["dense"] = self.index.search_dense(self._embed(query), candidates, sources=sources)
        if mode in ("hybrid", "keyword"):
            hits["keyword"] = self.index.search_keyword(query, candidates, sources=sources)

        chunks: dict[tuple[str, str], Chunk] = {}
        scores: dict[tuple[str, str], dict[str, float]] = {}
        for name, ranked in hits.items():
            for chunk, score in ranked:
                key = (chunk.source, chunk.id)
                chunks[key] = chunk
                scores.setdefault(key, {})[name] = score

        if mode == "hybrid":
            if self.fusion == "rrf":
                rankings = {name: [(c.source, c.id) for c, _ in ranked] for name, ranked in hits.items()}
                fused = reciprocal_rank_fusion(rankings, k=self.settings.rrf_k, weights=self.weights)
            else:
                scored = {name: [((c.source, c.id), s) for c, s in ranked] for name, ranked in hits.items()}
                fused = relative_score_fusion(scored, weights=self.weights)
            for key, score in fused:
                scores[key]["fused"] = score
            ordered = fused
        else:
            ordered = [((c.source, c.id), s) for c, s in hits[mode]]

        limit = candidates if self.reranker is not None else k
        passages = [Passage(chunk=chunks[key], score=score, scores=scores[key]) for key, score in ordered[:limit]]
        if self.reranker is not None and passages:
            passages = self.reranker.rerank(query, passages)
        return passages[:k]

    def _embed(self, query: str):
        return self.embedder.embed_query(query)
