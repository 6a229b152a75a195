"""Retrieval quality (hit@1/5/10, MRR, nDCG@10) on COVID-QA, HotpotQA and FinanceBench, before and after page
furniture and window context, in one run.

Runs the real loaders (the FinanceBench PDFs through ingest.loaders), chunker (sentence windows, furniture, context
lines), embedding (ingest.pipeline) and TenantIndex + HybridRetriever in a temporary data dir, twice per set:
  before: furniture chunked like any text, no context line (lorag before both);
  after:  the defaults (furniture kept out of chunks, context line mixed into each window vector and read by BM25).
The after hybrid is reported as a ratio to the before hybrid, and to the better of its own dense and keyword
retrievers. Ablation rows (exact search in numpy, fused the same way) say where a change comes from, and score the
context line written in front of each window instead of mixed in.
    python benchmarks/retrieval_quality.py --cache /tmp/q             # seeded subsample, minutes on an idle CPU
    python benchmarks/retrieval_quality.py --limit 0 --covid-docs 0 --device cuda   # everything
"""

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.records import Chunk, DocumentRecord  # noqa: E402
from core.settings import ChunkingSettings, EmbeddingSettings, RetrievalSettings  # noqa: E402
from ingest.chunking import Chunker  # noqa: E402
from ingest.loaders import Page, first_line_title, load_document, readable_stem  # noqa: E402
from ingest.pipeline import mix_context  # noqa: E402
from ingest.settings import IngestSettings  # noqa: E402
from retrieval.embedder import Embedder  # noqa: E402
from retrieval.index import TenantIndex  # noqa: E402
from retrieval.keyword import KeywordIndex  # noqa: E402
from retrieval.ranking_metrics import hit_at_k, mean_scores, ndcg_at_k, reciprocal_rank  # noqa: E402
from retrieval.retriever import HybridRetriever, zscore_fusion  # noqa: E402

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
CUTOFFS = (1, 5, 10)
CANDIDATES = 100
WHOLE_PAGE = sys.maxsize  # a relevant span that is a whole page (FinanceBench evidence pages)


@dataclass
class Document:
    pages: list[Page]
    title: str


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="covidqa,hotpotqa,financebench")
    p.add_argument("--limit", type=int, default=200, help="questions per dataset, seeded sample (0 = all)")
    p.add_argument("--covid-docs", type=int, default=30, help="COVID-QA articles in the corpus, seeded (0 = all 98)")
    p.add_argument("--seed", type=int, default=0, help="sample of COVID-QA and HotpotQA (FinanceBench: all 39)")
    p.add_argument("--device", default=None, help="embedder device (default: cuda when available)")
    p.add_argument("--data-root", type=Path, default=DATASETS)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--cache", type=Path, default=None, help="directory for embedding caches (.npy) between runs")
    return p.parse_args(argv)


# ---- corpora: (documents: source -> Document, questions: [(question, relevant (source, page, start, end))]) ----

def load_covidqa(root: Path, *, limit: int, docs: int, seed: int):
    articles = json.loads((root / "covidqa" / "covidQA.json").read_text())["data"]
    rng = random.Random(seed)
    if docs:
        articles = rng.sample(articles, min(docs, len(articles)))
    documents, questions, skipped = {}, [], 0
    for article in articles:
        for paragraph in article["paragraphs"]:
            source = f"covid/{paragraph['document_id']}"
            context = paragraph["context"]
            # As a text file: its first line is the article's title.
            documents[source] = Document([Page(1, context)], first_line_title(context) or readable_stem(Path(source)))
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = answer["answer_start"]
                if context[start : start + len(answer["text"])] != answer["text"]:
                    start = context.find(answer["text"])  # some offsets are off: match the text instead
                if start < 0:
                    skipped += 1
                    continue
                # Relevant: any chunk of this article overlapping the answer span.
                questions.append((qa["question"], {(source, 1, start, start + len(answer["text"]))}))
    questions = _sample(questions, limit, rng)
    return documents, questions, f"{len(articles)} articles, {len(questions)} questions ({skipped} unmatched answers dropped)"


def load_hotpotqa(root: Path, *, limit: int, seed: int):
    rows = [json.loads(line) for line in (root / "hotpotqa" / "dev_subsampled.jsonl").read_text().splitlines()]
    rows = _sample(rows, limit, random.Random(seed))
    documents, questions = {}, []
    for row in rows:
        relevant = set()
        for context in row["contexts"]:
            # Identical paragraphs recur across questions: key them by title and text so the pool has each once.
            text = context["paragraph_text"]
            source = f"hotpot/{context['title']}#{hashlib.sha256(text.encode()).hexdigest()[:8]}"
            # As a text file named after its article: the title is the file name (the first line is a sentence).
            documents[source] = Document([Page(1, text)], first_line_title(text) or context["title"])
            if context["is_supporting"]:
                relevant.add((source, 1, 0, len(text)))
        questions.append((row["question_text"], relevant))
    return documents, questions, f"{len(rows)} questions, {len(documents)} pooled paragraphs"


def load_financebench(root: Path):
    """The 9 filings through the real PDF loader; relevant = any chunk of an evidence page."""
    documents, lines, furniture = {}, 0, 0
    for path in sorted((root / "financebench" / "pdfs").glob("*.pdf")):
        loaded = load_document(path, settings=IngestSettings())
        documents[path.name] = Document(loaded.pages, loaded.title)
        lines += sum(1 for page in loaded.pages for line in page.text.splitlines() if line.strip())
        furniture += sum(len(page.furniture) for page in loaded.pages)
    questions = []
    for line in (root / "financebench" / "questions.jsonl").read_text().splitlines():
        row = json.loads(line)
        questions.append((row["question"], {(row["doc"], e["page_0based"] + 1, 0, WHOLE_PAGE) for e in row["evidence"]}))
    pages = sum(len(d.pages) for d in documents.values())
    return documents, questions, (f"{len(documents)} filings, {pages} pages, {len(questions)} questions; "
                                  f"{furniture} of {lines} lines are page furniture")


def _sample(items: list, limit: int, rng: random.Random) -> list:
    return rng.sample(items, limit) if limit and limit < len(items) else items


# ---- chunks, vectors, indexes ---------------------------------------------------------------------

def embed_cached(embedder: Embedder, texts: list[str], cache: Path | None) -> np.ndarray:
    """Embed ``texts``, reusing a .npy file (never pickled) keyed by the model and the texts."""
    if cache is None:
        return embedder.embed_documents(texts)
    key = hashlib.sha256("\x1f".join([embedder.name, *texts]).encode()).hexdigest()[:20]
    path = cache / f"vectors-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    vectors = embedder.embed_documents(texts)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors, allow_pickle=False)
    return vectors


def chunk_arm(documents: dict[str, Document], chunker: Chunker, *, furniture: bool, tenant: str) -> list[Chunk]:
    chunks = []
    for source, document in documents.items():
        pages = document.pages if furniture else [replace(page, furniture=()) for page in document.pages]
        chunks += chunker.split_pages(pages, tenant=tenant, document_id=_document_id(source), source=source,
                                      title=document.title)
    return chunks


def _document_id(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:32]


@dataclass
class Arm:
    """One arm's chunks (reading order), each chunk's first vector row, its plain window vectors and the index."""

    chunks: list[Chunk]
    starts: np.ndarray
    plain: np.ndarray  # (windows, dimension): the windows alone
    index: TenantIndex


def build_arm(data_dir: Path, tenant: str, chunks: list[Chunk], embedder: Embedder, cache: Path | None,
              *, context_weight: float) -> Arm:
    """Index ``chunks`` with the vectors ingest gives them (``ingest.pipeline.embed_chunks``, embeddings cached)."""
    plain = embed_cached(embedder, [text for chunk in chunks for text in chunk.embedded_texts()], cache)
    vectors = with_context(plain, chunks, embedder, cache, weight=context_weight)
    index = TenantIndex.open(data_dir, tenant, embedder_name=embedder.name, dimension=embedder.dimension)
    by_source: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        by_source.setdefault(chunk.source, []).append(chunk)
    with index.update() as update:
        offset = 0
        for source, document_chunks in by_source.items():
            count = sum(len(chunk.embedded_texts()) for chunk in document_chunks)
            record = DocumentRecord(document_chunks[0].document_id, tenant, source, max(c.page for c in document_chunks),
                                    len(document_chunks), 0, "-")
            update.put_document(record, document_chunks, vectors[offset : offset + count])
            offset += count
        update.commit()
    counts = np.asarray([len(chunk.embedded_texts()) for chunk in chunks])
    return Arm(chunks, np.concatenate([[0], np.cumsum(counts)[:-1]]), plain, index)


def with_context(plain: np.ndarray, chunks: list[Chunk], embedder: Embedder, cache: Path | None, *,
                 weight: float) -> np.ndarray:
    contexts = sorted({chunk.context for chunk in chunks if chunk.context})
    if not contexts or weight == 0:
        return plain
    context_vectors = dict(zip(contexts, embed_cached(embedder, contexts, cache)))
    return mix_context(plain.copy(), chunks, context_vectors, weight=weight)


# ---- rankings and metrics -----------------------------------------------------------------------------

Ranked = list[tuple[Chunk, float]]  # best first


def dense_rankings(arm: Arm, vectors: np.ndarray, query_vectors: np.ndarray) -> list[Ranked]:
    """Exact search in numpy: a chunk scores by its best window (as TenantIndex.search_dense does)."""
    best = np.maximum.reduceat(query_vectors @ vectors.T, arm.starts, axis=1)  # (queries, chunks)
    top = np.argsort(-best, axis=1, kind="stable")[:, :CANDIDATES]
    return [[(arm.chunks[i], float(row[i])) for i in order] for row, order in zip(best, top)]


def keyword_rankings(arm: Arm, questions, *, with_context: bool) -> list[Ranked]:
    if with_context:  # the product's: BM25 over each chunk's context line and text
        return [arm.index.search_keyword(question, CANDIDATES) for question, _ in questions]
    keyword = KeywordIndex(np.arange(len(arm.chunks)), [chunk.text for chunk in arm.chunks])
    return [[(arm.chunks[i], s) for i, s in keyword.search(question, CANDIDATES)] for question, _ in questions]


def fuse(dense: list[Ranked], keyword: list[Ranked]) -> list[Ranked]:
    """What HybridRetriever does with RetrievalSettings(): z-score fusion, dense weight 0.5."""
    settings = RetrievalSettings()
    weights = {"dense": settings.dense_weight, "keyword": 1.0 - settings.dense_weight}
    fused = []
    for d, k in zip(dense, keyword):
        by_key = {(c.source, c.id): c for c, _ in d + k}
        scored = {"dense": [((c.source, c.id), s) for c, s in d], "keyword": [((c.source, c.id), s) for c, s in k]}
        ranked = zscore_fusion(scored, weights=weights, confidence_power=settings.confidence_power)
        fused.append([(by_key[key], score) for key, score in ranked])
    return fused


def is_relevant(chunk: Chunk, spans: set) -> bool:
    return any(chunk.source == s and chunk.page == p and chunk.start < e and start < chunk.end
               for s, p, start, e in spans)


def score(rankings: list[Ranked], questions, chunks: list[Chunk]) -> dict[str, float]:
    rows = []
    for ranking, (_, spans) in zip(rankings, questions):
        flags = [is_relevant(chunk, spans) for chunk, _ in ranking[:10]]
        row = {f"hit@{k}": hit_at_k(flags, k) for k in CUTOFFS}
        row["MRR"] = reciprocal_rank(flags, 10)
        row["nDCG@10"] = ndcg_at_k(flags, 10, relevant=sum(is_relevant(c, spans) for c in chunks))
        rows.append(row)
    return mean_scores(rows)


# ---- one dataset ----------------------------------------------------------------------------------------------

def run_dataset(name: str, documents: dict[str, Document], questions, embedder: Embedder, data_dir: Path,
                cache: Path | None) -> dict:
    started = time.perf_counter()
    settings = ChunkingSettings()
    before_chunker = Chunker(embedder.tokenizer, settings.model_copy(update={"window_context": False}))
    after_chunker = Chunker(embedder.tokenizer, settings)
    before = build_arm(data_dir / name, "before", chunk_arm(documents, before_chunker, furniture=False, tenant="before"),
                       embedder, cache, context_weight=0.0)
    after = build_arm(data_dir / name, "after", chunk_arm(documents, after_chunker, furniture=True, tenant="after"),
                      embedder, cache, context_weight=settings.context_weight)
    built = time.perf_counter() - started
    query_vectors = embed_cached(embedder, [q for q, _ in questions], cache)

    results: dict[str, dict[str, float]] = {}
    for label, arm in (("before", before), ("after", after)):
        dense = [arm.index.search_dense(vector, CANDIDATES) for vector in query_vectors]
        keyword = [arm.index.search_keyword(question, CANDIDATES) for question, _ in questions]
        hybrid = fuse(dense, keyword)
        results[f"{label}: dense"] = score(dense, questions, arm.chunks)
        results[f"{label}: keyword (BM25)"] = score(keyword, questions, arm.chunks)
        results[f"{label}: hybrid"] = score(hybrid, questions, arm.chunks)
        # The hybrid rows must be exactly what HybridRetriever returns (the server's code path).
        retriever = HybridRetriever(arm.index, _PrecomputedQueries(dict(zip([q for q, _ in questions], query_vectors))),
                                    RetrievalSettings(k=10))
        check = [[p.chunk.id for p in retriever.retrieve(q, k=10)] for q, _ in questions[:50]]
        assert check == [[c.id for c, _ in ranking[:10]] for ranking in hybrid[:50]], f"{name} {label}: not the product"

    # Ablations on the after arm's chunks: where the gain comes from, and the rejected alternative.
    mixed = with_context(after.plain, after.chunks, embedder, cache, weight=settings.context_weight)
    prefixed = embed_cached(embedder, [f"{c.context}: {t}" if c.context else t
                                       for c in after.chunks for t in c.embedded_texts()], cache)
    keyword_text = keyword_rankings(after, questions, with_context=False)
    keyword_context = keyword_rankings(after, questions, with_context=True)
    ablations = {
        "after, no context line (furniture only)": (after.plain, keyword_text),
        "after, context in keyword only": (after.plain, keyword_context),
        "after, context in dense only": (mixed, keyword_text),
        "after, context written before each window": (prefixed, keyword_context),
    }
    for label, (vectors, keyword) in ablations.items():
        dense = dense_rankings(after, vectors, query_vectors)
        if label.endswith("before each window"):
            results["after, context written before each window: dense"] = score(dense, questions, after.chunks)
        results[f"{label}: hybrid"] = score(fuse(dense, keyword), questions, after.chunks)
    for arm in (before, after):
        arm.index.close()
    return {"chunks": {"before": len(before.chunks), "after": len(after.chunks)},
            "build_seconds": round(built, 1), "metrics": results}


class _PrecomputedQueries:
    def __init__(self, vectors: dict[str, np.ndarray]):
        self.embed_query: Callable[[str], np.ndarray] = vectors.__getitem__


def print_table(name: str, description: str, result: dict) -> None:
    metrics = result["metrics"]
    columns = list(metrics["before: hybrid"])
    chunks = result["chunks"]
    print(f"\n## {name}: {description}; {chunks['before']} chunks before, {chunks['after']} after "
          f"(indexes built in {result['build_seconds']} s)")
    print(f"{'mode':52s}" + "".join(f"{c:>9s}" for c in columns))
    for mode, values in metrics.items():
        print(f"{mode:52s}" + "".join(f"{values[c]:9.3f}" for c in columns))
    baseline = metrics["before: hybrid"]
    print("ratios to the before hybrid, same run:")
    for mode in metrics:
        if mode.endswith("hybrid") and mode != "before: hybrid":
            print(f"{mode:52s}" + "".join(f"{metrics[mode][c] / baseline[c]:9.3f}" if baseline[c] else f"{'-':>9s}"
                                          for c in columns))
    best_single = {c: max(metrics["after: dense"][c], metrics["after: keyword (BM25)"][c]) for c in columns}
    print("ratio of the after hybrid to the better of its dense and keyword retrievers:")
    print(f"{'after: hybrid':52s}" + "".join(f"{metrics['after: hybrid'][c] / best_single[c]:9.3f}"
                                             if best_single[c] else f"{'-':>9s}" for c in columns))


def main(argv=None) -> int:
    args = parse_args(argv)
    embedder = Embedder(EmbeddingSettings(device=args.device))
    print(f"embedder {embedder.name} (dimension {embedder.dimension}), seed {args.seed}, "
          f"limit {args.limit or 'all'}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    report = {}
    with tempfile.TemporaryDirectory(prefix="lorag-quality-") as tmp:
        for name in args.datasets.split(","):
            if name == "covidqa":
                documents, questions, description = load_covidqa(args.data_root, limit=args.limit,
                                                                 docs=args.covid_docs, seed=args.seed)
            elif name == "hotpotqa":
                documents, questions, description = load_hotpotqa(args.data_root, limit=args.limit, seed=args.seed)
            elif name == "financebench":
                documents, questions, description = load_financebench(args.data_root)
            else:
                raise SystemExit(f"unknown dataset {name!r}: use covidqa, hotpotqa and/or financebench")
            result = run_dataset(name, documents, questions, embedder, Path(tmp), args.cache)
            print_table(name, description, result)
            report[name] = {"description": description, **result}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
