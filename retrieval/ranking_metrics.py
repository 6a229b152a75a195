"""Ranking metrics over one ranked list of relevance flags (best first): hit@k, recall@k, MRR, nDCG@k.

Pure functions shared by ``lorag eval`` and benchmarks/retrieval_quality.py, so both count the same way.
Relevance is binary; ``relevant`` is how many relevant items exist in the whole collection.
"""

import math
from collections.abc import Iterable, Sequence


def hit_at_k(flags: Sequence[bool], k: int) -> float:
    """1.0 when one of the first ``k`` results is relevant, else 0.0."""
    _check_k(k)
    return 1.0 if any(flags[:k]) else 0.0


def recall_at_k(flags: Sequence[bool], k: int, *, relevant: int) -> float:
    """Share of all ``relevant`` items found in the first ``k`` results; 0.0 when nothing is relevant."""
    _check_k(k)
    if relevant <= 0:
        return 0.0
    return min(sum(1 for flag in flags[:k] if flag), relevant) / relevant


def reciprocal_rank(flags: Sequence[bool], k: int | None = None) -> float:
    """1 / rank of the first relevant result (ranks from 1) within the first ``k`` (all when None); 0.0 if none."""
    for rank, flag in enumerate(flags[:k] if k is not None else flags, start=1):
        if flag:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(flags: Sequence[bool], k: int, *, relevant: int) -> float:
    """Binary-gain nDCG: DCG of the first ``k`` results over the DCG of ``min(relevant, k)`` hits on top."""
    _check_k(k)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, flag in enumerate(flags[:k], start=1) if flag)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(relevant, k) + 1))
    return dcg / ideal if ideal else 0.0


def ranking_scores(flags: Sequence[bool], *, relevant: int, cutoffs: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """hit@k and recall@k for each cutoff, MRR (within the largest cutoff) and nDCG@10 of one ranking."""
    cutoffs = sorted(set(cutoffs))
    scores = {f"hit@{k}": hit_at_k(flags, k) for k in cutoffs}
    scores |= {f"recall@{k}": recall_at_k(flags, k, relevant=relevant) for k in cutoffs}
    scores["MRR"] = reciprocal_rank(flags, cutoffs[-1])
    scores["nDCG@10"] = ndcg_at_k(flags, 10, relevant=relevant)
    return scores


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The per-metric mean of several ``ranking_scores`` results (empty dict for no rows)."""
    if not rows:
        return {}
    return {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
