"""BM25 keyword search over a tenant's chunk texts (bm25s), built in memory from SQLite when first needed.

Terms are lower-cased, English stopwords dropped and, when PyStemmer is installed, Snowball-stemmed
("infections" matches "infection"); benchmarks/RESULTS.md ("Retrieval") has the measured effect.
"""

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


_stemmers = threading.local()  # PyStemmer objects must not be shared between threads: one per thread and language


def load_stemmer(language: str | None):
    """This thread's PyStemmer stemmer for ``language``, or None when ``language`` is None or PyStemmer is
    missing."""
    if language is None:
        return None
    cached = getattr(_stemmers, "by_language", None)
    if cached is None:
        cached = _stemmers.by_language = {}
    if language not in cached:
        try:
            import Stemmer
        except ImportError:  # keyword search still works, only without stemming (said once per thread)
            log.warning("PyStemmer is not installed: BM25 runs without stemming (pip install PyStemmer)")
            cached[language] = None
        else:
            cached[language] = Stemmer.Stemmer(language)
    return cached[language]


def stem_words(words: list[str], language: str = "english") -> list[str]:
    """``words`` Snowball-stemmed with this thread's stemmer, as the keyword index stems them (unchanged
    without PyStemmer)."""
    stemmer = load_stemmer(language)
    return stemmer.stemWords(words) if stemmer is not None else words


def _bm25s():
    """Import bm25s lazily (it pulls in scipy). It sets its own logger to DEBUG on import, which would print its
    progress notes whatever the application configured: hand the level back to the logging configuration."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


def tokenize(texts: list[str], *, stemmer=None) -> list[list[str]]:
    """Each text's BM25 terms: lower-cased words of 2+ characters, English stopwords out, stemmed if asked."""
    bm25s = _bm25s()

    return bm25s.tokenize(texts, lower=True, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)


def idf(document_frequency: int, chunk_count: int) -> float:
    """Lucene BM25's inverse document frequency, the weight bm25s (and retrieval.pg.keyword) gives a term."""
    return math.log(1 + (chunk_count - document_frequency + 0.5) / (document_frequency + 0.5))


@dataclass(frozen=True)
class TermWeights:
    """A text's keyword terms, each weighted by how rare it is in one tenant's index (BM25's idf; a term no chunk
    holds weighs most). Answerability uses it to ask how much of a question a passage covers with the question's
    rare words counting most: "Is there an iPhone app?" over documents that never say "iPhone"."""

    weights: dict[str, float]
    stemmer_language: str | None = "english"

    def without(self, terms: frozenset[str]) -> "TermWeights":
        """These weights less ``terms`` (stemmed as the index stems them)."""
        return TermWeights({t: w for t, w in self.weights.items() if t not in terms}, self.stemmer_language)

    def held(self, texts: list[str]) -> list[frozenset[str]]:
        """Per text, which of these terms it holds."""
        if not texts or not self.weights:
            return [frozenset()] * len(texts)
        stemmer = load_stemmer(self.stemmer_language)
        return [frozenset(terms).intersection(self.weights) for terms in tokenize(texts, stemmer=stemmer)]

    def share(self, terms: frozenset[str]) -> float:
        """The share of the total weight that ``terms`` carry (0 for no term, or when there is no weight)."""
        total = sum(self.weights.values())
        return sum(self.weights[t] for t in terms if t in self.weights) / total if total > 0 else 0.0


class KeywordIndex:
    """BM25 (Lucene variant) over ``texts``; hits are reported by the ``rowids`` given alongside them."""

    def __init__(self, rowids: np.ndarray, texts: list[str], *, stemmer_language: str | None = "english"):
        bm25s = _bm25s()

        self.rowids = np.asarray(rowids, dtype=np.int64)
        self.stemmer_language = stemmer_language
        stemmer = load_stemmer(stemmer_language)
        self.stemmed = stemmer is not None
        self._bm25 = None
        self._document_frequency = np.zeros(0, dtype=np.int64)  # by bm25s's term id
        self._term_ids: dict[str, int] = {}
        if len(texts):
            corpus_tokens = bm25s.tokenize(texts, lower=True, stopwords="en", stemmer=stemmer, show_progress=False)
            self._bm25 = bm25s.BM25()
            self._bm25.index(corpus_tokens, show_progress=False)
            # Chunks holding each term: bm25s's score matrix (one column of stored scores per term, saved with
            # its index) has one entry per chunk the term occurs in. Its vocabulary may end in an empty term
            # that no column counts: zero.
            counts = np.diff(np.asarray(self._bm25.scores["indptr"], dtype=np.int64))
            self._document_frequency = np.pad(counts, (0, max(0, len(corpus_tokens.vocab) - len(counts))))
            self._term_ids = corpus_tokens.vocab
        log.debug("keyword index built over %d chunks (stemmed: %s)", len(texts), self.stemmed)

    def __len__(self) -> int:
        return len(self.rowids)

    def term_weights(self, text: str) -> TermWeights:
        """``text``'s terms with their idf over this index's chunks (see :class:`TermWeights`)."""
        stemmer = load_stemmer(self.stemmer_language) if self.stemmed else None
        terms = set(tokenize([text], stemmer=stemmer)[0])
        known = self._term_ids
        return TermWeights({term: idf(int(self._document_frequency[known[term]]) if term in known else 0, len(self))
                            for term in terms}, self.stemmer_language if self.stemmed else None)

    def search(self, query: str, k: int, *, allowed_rowids: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The ``k`` best ``(rowid, bm25 score)`` pairs, best first; only chunks sharing a term with the query."""
        if self._bm25 is None or k <= 0:
            return []
        vocabulary = self._bm25.vocab_dict
        # A fresh stemmer per query: PyStemmer objects must not be shared between threads.
        stemmer = load_stemmer(self.stemmer_language) if self.stemmed else None
        terms = [term for term in tokenize([query], stemmer=stemmer)[0] if term in vocabulary]
        if not terms:
            return []
        scores = self._bm25.get_scores(terms)  # (n_chunks,)
        if allowed_rowids is not None:
            scores = np.where(np.isin(self.rowids, allowed_rowids), scores, 0.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.rowids[i]), float(scores[i])) for i in top if scores[i] > 0]
