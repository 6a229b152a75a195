"""Hybrid retrieval: dense (FAISS) and keyword (BM25) hits fused into one ranking, optionally reranked.

Default fusion: z-scored candidate scores, 0.5 dense (a chunk scores by its best sentence window) / 0.5
keyword, optionally re-weighted per query towards the retriever whose best hit stands out more (see
zscore_fusion; measured against min-max, RRF and each retriever alone, tuned and held-out seeds, in
benchmarks/RESULTS.md "Retrieval").
"""
import logging
from collections.abc import Hashable, Mapping, Sequence

from core.errors import LoragError
from retrieval.index import TenantIndex
from retrieval.reranker import Reranker
from core.settings import RetrievalSettings
from core.records import Chunk, Passage

log = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "keyword")
FUSIONS = ("zscore", "relative", "rrf")


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


def zscore_fusion(
    scored: Mapping[str, Sequence[tuple[Hashable, float]]],
    *,
    weights: Mapping[str, float] | None = None,
    confidence_power: float = 0.0,
) -> list[tuple[Hashable, float]]:
    """Fuse scored lists by standardised scores: ``score(d) = sum_r weight_r * (s_r(d) - mean_r) / std_r``.

    Why z-scores: min-max (:func:`relative_score_fusion`) maps every list's top hit to 1, so a retriever
    whose candidates all score alike still gets a full vote for its first one. A z-score keeps how far a
    hit stands out from that list's other candidates: a sure retriever outvotes an unsure one, per query,
    whichever of the two it is. An item missing from a list gets that list's lowest z (it scored at most
    as well as the worst candidate there); a list whose scores are all equal contributes 0 to every item.

    ``confidence_power`` > 0 also moves the weights themselves per query: each list's weight is scaled by
    ``top_z_r ** confidence_power`` (``top_z_r``: the z-score of its best hit, floored at 0) and the weights
    are rescaled to their original sum. 0 keeps ``weights`` as given.
    Returns ``(item, score)`` best first; ties keep the order in which items were first seen.
    """
    standardised: dict[str, dict[Hashable, float]] = {}
    for name, ranking in scored.items():
        if not ranking:
            continue
        values = [score for _, score in ranking]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        standardised[name] = {item: (score - mean) / std if std > 0 else 0.0 for item, score in ranking}
    fused: dict[Hashable, float] = {}
    for z in standardised.values():
        for item in z:
            fused.setdefault(item, 0.0)
    fixed = {name: 1.0 if weights is None else weights.get(name, 1.0) for name in standardised}
    effective = _confidence_weights(fixed, standardised, confidence_power)
    for name, z in standardised.items():
        floor = min(z.values())
        for item in fused:
            fused[item] += effective[name] * z.get(item, floor)
    return sorted(fused.items(), key=lambda pair: -pair[1])  # sorted() is stable: first-seen wins ties


def _confidence_weights(
    fixed: dict[str, float], standardised: dict[str, dict[Hashable, float]], power: float
) -> dict[str, float]:
    """``fixed`` weights scaled by each list's top z-score ** ``power``, rescaled to the same total.

    Falls back to ``fixed`` when ``power`` is 0 or no list has a best hit above its mean (nothing to go by).
    """
    if power == 0:
        return fixed
    scaled = {name: fixed[name] * max(max(z.values()), 0.0) ** power for name, z in standardised.items()}
    total = sum(scaled.values())
    if total <= 0:
        return fixed
    return {name: value * sum(fixed.values()) / total for name, value in scaled.items()}


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
        fusion: str | None = None,
        weights: Mapping[str, float] | None = None,
    ):
        fusion = settings.fusion if fusion is None else fusion
        if fusion not in FUSIONS:
            raise LoragError(f"unknown retrieval fusion {fusion!r}", hint=f"Use one of {', '.join(FUSIONS)}")
        self.index = index
        self.embedder = embedder
        self.settings = settings
        self.reranker = reranker
        self.fusion = fusion
        # Per-retriever fusion weights. None: settings.dense_weight for score fusion; RRF counts both equally.
        if weights is None and fusion != "rrf":
            weights = {"dense": settings.dense_weight, "keyword": 1.0 - settings.dense_weight}
        self.weights = weights

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
                if self.fusion == "zscore":
                    fused = zscore_fusion(
                        scored, weights=self.weights, confidence_power=self.settings.confidence_power
                    )
                else:
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
