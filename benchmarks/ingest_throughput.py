"""Ingest throughput: ``lorag ingest`` against the naive LangChain pipeline on the FinanceBench PDFs.

Both use the same files and the same embedding model, in one process; model loading is not timed.
Prints chunks/s for each and the ratio, then evidence-page hit@k on the FinanceBench questions for
both, so a speed-up that costs retrieval quality shows up. Run from the repository root:

    python benchmarks/ingest_throughput.py --limit 3
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "financebench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="folder with pdfs/ and questions.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="use only the N smallest PDFs (keeps a run to minutes)")
    parser.add_argument("--k", type=int, default=5, help="hit@k for the evidence-page check")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both pipelines")
    parser.add_argument("--with-float32", action="store_true", help="also time lorag with a float32 embedder")
    parser.add_argument("--naive-chunk-chars", type=int, default=1000, help="naive splitter chunk_size (characters)")
    parser.add_argument("--naive-overlap-chars", type=int, default=150)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def select_pdfs(dataset: Path, limit: int | None) -> list[Path]:
    pdfs = sorted((dataset / "pdfs").glob("*.pdf"), key=lambda p: p.stat().st_size)
    return pdfs[:limit] if limit else pdfs


def load_questions(dataset: Path, pdfs: list[Path]) -> list[dict]:
    names = {pdf.name for pdf in pdfs}
    with open(dataset / "questions.jsonl", encoding="utf-8") as handle:
        questions = [json.loads(line) for line in handle if line.strip()]
    return [q for q in questions if q["doc"] in names]


def hit(retrieved: list[tuple[str, int]], question: dict) -> bool:
    """Any of the retrieved (file name, 0-based page) pairs is an evidence page of the question's file."""
    evidence = {(question["doc"], item["page_0based"]) for item in question["evidence"]}
    return any(pair in evidence for pair in retrieved)


def run_naive(pdfs: list[Path], questions: list[dict], args: argparse.Namespace, model_path: str) -> dict:
    """PyPDFLoader + RecursiveCharacterTextSplitter + HuggingFaceEmbeddings + FAISS.from_documents."""
    from langchain_community.document_loaders import PyPDFLoader
    from langchain_community.vectorstores import FAISS
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    embeddings = HuggingFaceEmbeddings(model_name=model_path)
    embeddings.embed_documents(["warm up"])
    started = time.perf_counter()
    documents = []
    for pdf in pdfs:
        documents.extend(PyPDFLoader(str(pdf)).load())
    splitter = RecursiveCharacterTextSplitter(chunk_size=args.naive_chunk_chars, chunk_overlap=args.naive_overlap_chars)
    chunks = splitter.split_documents(documents)
    store = FAISS.from_documents(chunks, embeddings)
    seconds = time.perf_counter() - started
    hits = 0
    for question in questions:
        found = store.similarity_search(question["question"], k=args.k)
        hits += hit([(Path(d.metadata["source"]).name, int(d.metadata["page"])) for d in found], question)
    return _result("naive langchain", len(chunks), seconds, chunks=[c.page_content for c in chunks], hits=hits,
                   questions=len(questions))


def run_lorag(pdfs: list[Path], questions: list[dict], args: argparse.Namespace, *, dtype: str) -> dict:
    from ingest.pipeline import ingest_paths
    from retrieval.embedder import Embedder
    from retrieval.index import TenantIndex
    from core.settings import Settings

    with tempfile.TemporaryDirectory(prefix="lorag-bench-") as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        embedder = Embedder(settings.embedding, dtype=dtype)
        embedder.embed_documents(["warm up"])
        report = ingest_paths(pdfs, tenant="bench", settings=settings, embedder=embedder)
        if report.failed:
            raise SystemExit(f"lorag failed on: {[o.source for o in report.of('failed')]}")
        index = TenantIndex.open(settings.data_dir, "bench", embedder_name=embedder.name, dimension=embedder.dimension)
        try:
            texts = [c.text for r in index.documents() for c in index.chunks_of(r.document_id)]
            hits = 0
            for question in questions:
                found = index.search_dense(embedder.embed_query(question["question"]), args.k)
                hits += hit([(Path(c.source).name, c.page - 1) for c, _ in found], question)
        finally:
            index.close()
    label = "lorag" if dtype == "auto" else f"lorag ({dtype})"
    if dtype == "auto":
        label += f" (embedder {'bfloat16' if embedder._use_bfloat16(embedder.model) else 'float32'})"
    return _result(label, report.chunks_embedded, report.seconds, chunks=texts, hits=hits, questions=len(questions))


def _result(name: str, count: int, seconds: float, *, chunks: list[str], hits: int, questions: int) -> dict:
    return {
        "pipeline": name,
        "chunks": count,
        "seconds": round(seconds, 2),
        "chunks_per_s": round(count / seconds, 2),
        "mean_chunk_chars": round(sum(map(len, chunks)) / max(len(chunks), 1)),
        "hit_at_k": f"{hits}/{questions}",
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from core.settings import EmbeddingSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    pdfs = select_pdfs(args.dataset, args.limit)
    questions = load_questions(args.dataset, pdfs)
    pages = sum(len(__import__("pypdf").PdfReader(p).pages) for p in pdfs)
    print(f"{len(pdfs)} PDFs, {pages} pages, {sum(p.stat().st_size for p in pdfs) / 2**20:.1f} MiB, "
          f"{len(questions)} questions; torch threads {torch.get_num_threads()}", flush=True)
    model_path = EmbeddingSettings().model
    results = [run_naive(pdfs, questions, args, model_path)]
    print(results[-1], flush=True)
    results.append(run_lorag(pdfs, questions, args, dtype="auto"))
    print(results[-1], flush=True)
    if args.with_float32:
        results.append(run_lorag(pdfs, questions, args, dtype="float32"))
        print(results[-1], flush=True)
    naive, naive_seconds = results[0]["chunks_per_s"], results[0]["seconds"]
    # Chunk counts differ a little (token- vs character-sized chunks), so the wall-time ratio on the
    # same files is printed beside the chunks/s ratio.
    print(f"\n| pipeline | chunks | seconds | chunks/s | chunks/s vs naive | wall time vs naive | "
          f"mean chunk chars | evidence page hit@{args.k} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['pipeline']} | {r['chunks']} | {r['seconds']} | {r['chunks_per_s']} | "
              f"{r['chunks_per_s'] / naive:.2f}x | {naive_seconds / r['seconds']:.2f}x faster | "
              f"{r['mean_chunk_chars']} | {r['hit_at_k']} |")
    if args.json:
        args.json.write_text(json.dumps({"pdfs": [p.name for p in pdfs], "results": results}, indent=2))


if __name__ == "__main__":
    main()
