"""The PostgreSQL store (pgvector HNSW + BM25 postings) against the FAISS + SQLite files, in one run.

1. Scale (synthetic): --chunks chunks of --words random Zipf-distributed pseudo-words, one random unit vector
   each (dimension 384, as all-MiniLM-L6-v2; uniform, or --clusters centres plus noise), written through each store's real update interface in documents of
   1000 chunks, committed every 20k chunks (ingest.commit_every_chunks); then --queries dense queries (a stored
   vector plus noise, renormalised) and keyword queries (three words of a stored chunk), k=100 as the retriever
   asks. Reports ingest chunks/s, p50/p99 latency, and recall@10 of pgvector's HNSW against exact search.
2. Keyword quality (real): COVID-QA articles cut into --keyword-words word chunks; for each question, does the
   chunk holding the answer rank in the top 5, and how many of today's KeywordIndex top 10 does each PostgreSQL
   method return: the BM25 table this store uses, and PostgreSQL full-text search (ts_rank_cd, OR of the terms).

    nice python benchmarks/pg_store.py --chunks 100000
    nice python benchmarks/pg_store.py --chunks 20000 --clusters 1000 --skip-keyword
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.records import Chunk, DocumentRecord  # noqa: E402
from retrieval.index import TenantIndex  # noqa: E402
from retrieval.keyword import KeywordIndex  # noqa: E402
from retrieval.pg.database import Database, close_shared_databases  # noqa: E402
from retrieval.pg.index import PgTenantIndex  # noqa: E402
from retrieval.pg.keyword import query_terms  # noqa: E402
from retrieval.pg.schema import migrate  # noqa: E402

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
DIMENSION = 384
PER_DOCUMENT = 1000
COMMIT_EVERY = 20_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--words", type=int, default=60, help="words per synthetic chunk")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.03, help="per-dimension sigma added to a stored vector")
    p.add_argument("--clusters", type=int, default=0,
                   help="0: uniform random unit vectors; N: each vector a random one of N centres plus noise "
                        "(--cluster-noise), renormalised, which gives neighbours structure as real embeddings have")
    p.add_argument("--cluster-noise", type=float, default=0.05)
    p.add_argument("--keyword-words", type=int, default=150, help="words per COVID-QA chunk")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--skip-keyword", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def start_postgres(root: Path) -> tuple[object, str]:
    import pgserver
    import psycopg

    server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    dsn = server.get_uri()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS lorag_bench")
        connection.execute("CREATE DATABASE lorag_bench")
    dsn = dsn.replace("/postgres?", "/lorag_bench?")
    migrate(dsn)
    return server, dsn


def synthetic_documents(n: int, words: int, rng: np.random.Generator, *, clusters: int = 0, noise: float = 0.05):
    """Documents of PER_DOCUMENT chunks: (record, chunks, vectors (n, 384) unit rows)."""
    centres = rng.normal(size=(max(clusters, 1), DIMENSION)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vocabulary = np.array([f"w{number}" for number in range(20_000)])
    ranks = np.arange(1, len(vocabulary) + 1)
    zipf = (1 / ranks) / (1 / ranks).sum()
    for start in range(0, n, PER_DOCUMENT):
        count = min(PER_DOCUMENT, n - start)
        source = f"/corpus/doc-{start // PER_DOCUMENT:05d}.txt"
        texts = [" ".join(rng.choice(vocabulary, size=words, p=zipf)) for _ in range(count)]
        chunks, offset = [], 0
        for number, text in enumerate(texts):
            chunks.append(Chunk(f"c{start + number}", "bench", source, source, 1 + number // 10, offset,
                                offset + len(text), text))
            offset += len(text) + 1
        if clusters:
            vectors = centres[rng.integers(clusters, size=count)] + rng.normal(
                scale=noise, size=(count, DIMENSION)).astype(np.float32)
        else:
            vectors = rng.normal(size=(count, DIMENSION)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield DocumentRecord(source, "bench", source, 1 + count // 10, count, offset, "2026-01-01T00:00:00+00:00"), \
            chunks, vectors


def ingest(index, documents) -> tuple[float, np.ndarray, list[str]]:
    """Seconds to write every document (committing every COMMIT_EVERY chunks); all vectors; all texts."""
    vectors, texts, pending = [], [], 0
    started = time.perf_counter()
    update = index.update()
    for record, chunks, document_vectors in documents:
        update.put_document(record, chunks, document_vectors)
        vectors.append(document_vectors)
        texts += [chunk.text for chunk in chunks]
        pending += len(chunks)
        if pending >= COMMIT_EVERY:
            update.commit()
            update, pending = index.update(), 0
    update.commit()
    return time.perf_counter() - started, np.concatenate(vectors), texts


def latencies(search, queries) -> tuple[list, dict]:
    results, times = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(search(query))
        times.append(time.perf_counter() - started)
    ms = np.asarray(times) * 1000
    return results, {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def scale(args, dsn: str, root: Path) -> dict:
    rng = np.random.default_rng(args.seed)
    documents = list(synthetic_documents(args.chunks, args.words, rng, clusters=args.clusters,
                                         noise=args.cluster_noise))
    files = TenantIndex.open(root / "files", "bench", embedder_name="synthetic", dimension=DIMENSION)
    pg = PgTenantIndex.open(Database(dsn), "bench", embedder_name="synthetic", dimension=DIMENSION)
    report = {"chunks": args.chunks, "clusters": args.clusters}
    for name, index in (("files", files), ("postgresql", pg)):
        seconds, vectors, texts = ingest(index, documents)
        report[name] = {"ingest_s": seconds, "ingest_chunks_per_s": args.chunks / seconds}
        print(f"{name}: ingested {args.chunks} chunks in {seconds:.1f} s ({args.chunks / seconds:.0f} chunks/s)",
              flush=True)
    del documents
    picks = rng.choice(args.chunks, size=args.queries, replace=False)
    dense_queries = vectors[picks] + rng.normal(scale=args.noise, size=(args.queries, DIMENSION)).astype(np.float32)
    dense_queries /= np.linalg.norm(dense_queries, axis=1, keepdims=True)
    keyword_queries = [" ".join(rng.choice(texts[pick].split(), size=3, replace=False)) for pick in picks]
    exact = np.argsort(-(dense_queries @ vectors.T), axis=1)[:, :10]  # (queries, 10) chunk numbers
    for name, index in (("files", files), ("postgresql", pg)):
        index.search_keyword(keyword_queries[0], 100)  # the file store builds its BM25 index on first use
        dense, report[name]["dense"] = latencies(lambda q: index.search_dense(q, 100), dense_queries)
        _, report[name]["keyword"] = latencies(lambda q: index.search_keyword(q, 100), keyword_queries)
        found = [[int(chunk.id[1:]) for chunk, _ in hits[:10]] for hits in dense]
        report[name]["recall_at_10"] = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    for kind in ("dense", "keyword"):
        for stat in ("p50_ms", "p99_ms"):
            report[f"{kind}_{stat}_ratio_pg_over_files"] = report["postgresql"][kind][stat] / report["files"][kind][stat]
    report["ingest_ratio_pg_over_files"] = (report["postgresql"]["ingest_chunks_per_s"]
                                            / report["files"]["ingest_chunks_per_s"])
    with pg.database.connection() as connection:  # the plan really walks the HNSW graph at this size
        plan = connection.execute(
            f"EXPLAIN SELECT chunk_rowid FROM lorag.window_vectors_{pg.index_id} ORDER BY "
            f"(embedding::vector({DIMENSION})) <=> %s::vector({DIMENSION}) LIMIT 400", (dense_queries[0],)).fetchall()
    report["pg_dense_plan_uses_hnsw"] = any("Index Scan" in row[0] for row in plan)
    pg.database.close()
    return report


def covidqa_chunks(words_per_chunk: int):
    """(texts, questions, gold chunk number per question) from COVID-QA."""
    articles = json.loads((DATASETS / "covidqa" / "covidQA.json").read_text())["data"]
    texts, questions, gold = [], [], []
    for article in articles:
        for paragraph in article["paragraphs"]:
            context, spans, position = paragraph["context"], [], 0
            words = context.split()
            for start in range(0, len(words), words_per_chunk):
                piece = " ".join(words[start:start + words_per_chunk])
                begin = context.find(words[start], position)
                spans.append((len(texts), begin))
                texts.append(piece)
                position = begin + 1
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]["answer_start"]
                questions.append(qa["question"])
                gold.append(max(number for number, begin in spans if begin <= answer))
    return texts, questions, gold


def keyword_quality(args, dsn: str) -> dict:
    texts, questions, gold = covidqa_chunks(args.keyword_words)
    reference = KeywordIndex(np.arange(len(texts)), texts)
    pg = PgTenantIndex.open(Database(dsn), "covidqa", embedder_name="synthetic", dimension=DIMENSION)
    rng = np.random.default_rng(args.seed)
    with pg.update() as update:
        chunks = [Chunk(f"k{number}", "covidqa", "/covidqa.txt", "/covidqa.txt", 1, 0, len(text), text)
                  for number, text in enumerate(texts)]
        vectors = rng.normal(size=(len(chunks), DIMENSION)).astype(np.float32)
        update.put_document(DocumentRecord("/covidqa.txt", "covidqa", "/covidqa.txt", 1, len(chunks), 0, "x"),
                            chunks, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        update.commit()
    with pg.database.connection() as connection:
        connection.execute("ALTER TABLE lorag.chunks ADD COLUMN IF NOT EXISTS fts tsvector "
                           "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED")
        connection.execute("CREATE INDEX IF NOT EXISTS chunks_fts ON lorag.chunks USING gin (fts)")

    def full_text(question: str) -> list[int]:
        terms = [term for term in query_terms(question) if term.isalnum()]
        if not terms:
            return []
        with pg.database.connection() as connection:
            rows = connection.execute(
                "SELECT chunk_id FROM lorag.chunks, to_tsquery('english', %s) query WHERE index_id = %s "
                "AND fts @@ query ORDER BY ts_rank_cd(fts, query) DESC, rowid LIMIT 10",
                (" | ".join(terms), pg.index_id)).fetchall()
        return [int(row[0][1:]) for row in rows]

    methods = {
        "keyword_index_bm25s": lambda q: [rowid for rowid, _ in reference.search(q, 10)],
        "postgresql_bm25_table": lambda q: [int(c.id[1:]) for c, _ in pg.search_keyword(q, 10)],
        "postgresql_full_text": full_text,
    }
    report = {"chunks": len(texts), "questions": len(questions)}
    ranked = {name: [method(question) for question in questions] for name, method in methods.items()}
    for name, results in ranked.items():
        report[name] = {
            "hit_at_5": float(np.mean([g in r[:5] for g, r in zip(gold, results)])),
            "overlap_at_10_with_keyword_index": float(np.mean(
                [len(set(r) & set(b)) / max(len(b), 1) for r, b in zip(results, ranked["keyword_index_bm25s"])])),
        }
    pg.database.close()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorag-pg-bench-") as directory:
        root = Path(directory)
        root.chmod(0o755)  # as root, pgserver runs PostgreSQL as an unprivileged user that must reach it
        server, dsn = start_postgres(root)
        try:
            report = {}
            if not args.skip_keyword:
                report["keyword"] = keyword_quality(args, dsn)
                print(json.dumps(report["keyword"], indent=2), flush=True)
            if not args.skip_scale:
                report["scale"] = scale(args, dsn, root)
                print(json.dumps(report["scale"], indent=2), flush=True)
        finally:
            close_shared_databases()
            server.cleanup()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
