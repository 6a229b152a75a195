"""BM25 in SQL over a postings table, with the file store's tokeniser: the same terms, the same scores.

Why not PostgreSQL's full-text search: ``ts_rank`` is not BM25 (no inverse document frequency, no length
normalisation against the corpus average), and benchmarks/RESULTS.md ("PostgreSQL store") measures how far
its ranking falls from today's keyword index; this table reproduces bm25s's Lucene scores exactly.
"""

from collections import Counter

from retrieval.keyword import load_stemmer, tokenize

# bm25s's defaults (retrieval.keyword.KeywordIndex builds bm25s.BM25() with them).
K1 = 1.5
B = 0.75
STEMMER_LANGUAGE = "english"


def keyword_text(text: str, context: str) -> str:
    """What the keyword index reads for a chunk: its context line, then its text (as retrieval.store.texts)."""
    return f"{context}\n{text}" if context else text


def term_counts(texts: list[str]) -> list[Counter]:
    """Each text's BM25 terms with their frequencies (lower-cased, stopwords out, Snowball-stemmed)."""
    if not texts:
        return []
    return [Counter(terms) for terms in tokenize(texts, stemmer=load_stemmer(STEMMER_LANGUAGE))]


def query_terms(query: str) -> list[str]:
    """The query's terms, repeats kept: bm25s adds a repeated term's score once per occurrence."""
    return tokenize([query], stemmer=load_stemmer(STEMMER_LANGUAGE))[0]


# Parameters: index id (3 times), the query terms, the source filter (NULL: none), k.
# Lucene BM25: idf = ln(1 + (N - df + 0.5) / (df + 0.5)); term part = tf / (tf + k1 (1 - b + b dl / avgdl)).
BM25_SQL = f"""
WITH query AS (
    SELECT term, count(*) AS repeats FROM unnest(%(terms)s::text[]) AS term GROUP BY term
), stats AS (
    SELECT chunk_count::float8 AS n, greatest(term_total::float8 / greatest(chunk_count, 1), 1e-9) AS avgdl
    FROM lorag.indexes WHERE id = %(index)s
), frequencies AS (
    SELECT t.term, count(*)::float8 AS df FROM lorag.chunk_terms t JOIN query q ON q.term = t.term
    WHERE t.index_id = %(index)s GROUP BY t.term
)
SELECT t.chunk_rowid,
       sum(q.repeats * ln(1 + (s.n - f.df + 0.5) / (f.df + 0.5))
           * t.tf / (t.tf + {K1} * (1 - {B} + {B} * t.doc_length / s.avgdl))) AS score
FROM lorag.chunk_terms t
JOIN query q ON q.term = t.term
JOIN frequencies f ON f.term = t.term
CROSS JOIN stats s
WHERE t.index_id = %(index)s
  AND (%(sources)s::text[] IS NULL OR t.chunk_rowid IN (
        SELECT rowid FROM lorag.chunks WHERE index_id = %(index)s AND source = ANY(%(sources)s::text[])))
GROUP BY t.chunk_rowid
ORDER BY score DESC, t.chunk_rowid
LIMIT %(k)s
"""
