"""BM25 keyword search over a tenant's chunk texts (bm25s), built in memory from SQLite when first needed."""

import logging

import numpy as np

log = logging.getLogger(__name__)


def tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


class KeywordIndex:
    """BM25 (Lucene variant) over ``texts``; hits are reported by the ``rowids`` given alongside them."""

    def __init__(self, rowids: np.ndarray, texts: list[str]):
        import bm25s

        self.rowids = np.asarray(rowids, dtype=np.int64)
        self._bm25 = None
        if len(texts):
            corpus_tokens = bm25s.tokenize(texts, lower=True, stopwords="en", show_progress=False)
            self._bm25 = bm25s.BM25()
            self._bm25.index(corpus_tokens, show_progress=False)
        log.debug("keyword index built over %d chunks", len(texts))

    def __len__(self) -> int:
        return len(self.rowids)

    def search(self, query: str, k: int, *, allowed_rowids: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The ``k`` best ``(rowid, bm25 score)`` pairs, best first; only chunks sharing a term with the query."""
        if self._bm25 is None or k <= 0:
            return []
        vocabulary = self._bm25.vocab_dict
        terms = [term for term in tokenize([query])[0] if term in vocabulary]
        if not terms:
            return []
        scores = self._bm25.get_scores(terms)  # (n_chunks,)
        if allowed_rowids is not None:
            scores = np.where(np.isin(self.rowids, allowed_rowids), scores, 0.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.rowids[i]), float(scores[i])) for i in top if scores[i] > 0]
