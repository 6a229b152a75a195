"""Query latency (embed + vector search + SQLite metadata fetch) and recall@10 at 100k and 1M chunks.

Vectors are synthetic but shaped like real ones: each is a real question embedding (one of --centres
COVID-QA/HotpotQA questions) plus Gaussian noise, renormalised; queries are other, held-out real
questions embedded at query time. Chunk rows (text, page, span) are real SQLite rows in a TenantIndex,
each with --windows vectors (the index stores one per sentence window; real corpora average 3.5-5).
The baseline, measured in the same run, is exact inner-product search (IndexFlatIP) over the same vectors,
best window per chunk, + the same fetch.
    python benchmarks/query_latency.py --sizes 100000 1000000
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval.embedder import Embedder  # noqa: E402
from retrieval.index import TenantIndex  # noqa: E402
from core.settings import EmbeddingSettings  # noqa: E402
from core.records import Chunk, DocumentRecord  # noqa: E402

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
TENANT = "bench"
CHUNKS_PER_DOCUMENT = 1000
WORDS = ("protein", "virus", "cell", "patient", "study", "river", "film", "album", "season", "city", "vaccine",
         "sample", "result", "method", "infection", "team", "league", "novel", "species", "county")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--types", nargs="+", default=["hnsw", "ivf"], choices=["hnsw", "ivf", "flat"])
    p.add_argument("--hnsw-max-size", type=int, default=200_000, help="skip HNSW above this (build time on 2 cores)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--ef-search", type=int, nargs="+", default=[128, 256, 640])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.05, help="per-dimension sigma (0.05: cos to centre ~0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="query embedder device")
    p.add_argument("--model", default=None, help="embedding model (default: settings' default)")
    p.add_argument("--questions", type=Path, default=None, help="JSON list of questions (default: from the datasets)")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads while measuring queries")
    p.add_argument("--windows", type=int, default=5, help="vectors per chunk (1: one whole-chunk vector, format 1)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def load_questions(seed: int) -> list[str]:
    covid = json.loads((DATASETS / "covidqa" / "covidQA.json").read_text())["data"]
    questions = [qa["question"] for a in covid for p in a["paragraphs"] for qa in p["qas"]]
    for line in (DATASETS / "hotpotqa" / "dev_subsampled.jsonl").read_text().splitlines():
        questions.append(json.loads(line)["question_text"])
    questions = sorted(set(questions))
    random.Random(seed).shuffle(questions)
    return questions


def synthetic_vectors(centres: np.ndarray, n: int, *, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)  # (n, dimension)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block = block + rng.normal(0.0, noise, block.shape).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build_index(data_dir: Path, vectors: np.ndarray, *, windows: int, index_type: str, embedder: Embedder,
                seed: int) -> TenantIndex:
    """Chunk i owns vectors ``[i * windows, (i + 1) * windows)`` (its sentence windows, in order)."""
    rng = random.Random(seed)
    index = TenantIndex.open(data_dir, TENANT, embedder_name=embedder.name, dimension=vectors.shape[1],
                             index_type=index_type)
    total = len(vectors) // windows
    with index.update() as update:
        for document in range(0, total, CHUNKS_PER_DOCUMENT):
            source = f"synthetic/doc-{document // CHUNKS_PER_DOCUMENT:05d}.pdf"
            chunks = []
            for i in range(min(CHUNKS_PER_DOCUMENT, total - document)):
                text = " ".join(rng.choices(WORDS, k=60))
                start = (i % 5) * 500
                step = len(text) // windows
                spans = tuple((start + w * step, start + (w + 1) * step) for w in range(windows)) if windows > 1 else ()
                chunks.append(Chunk(id=f"{document + i:08x}", tenant=TENANT, document_id=source, source=source,
                                    page=1 + i // 5, start=start, end=start + len(text), text=text,
                                    heading_path=("Section",), windows=spans))
            record = DocumentRecord(source, TENANT, source, 1 + (len(chunks) - 1) // 5, len(chunks), 10**6, "-")
            update.put_document(record, chunks, vectors[document * windows : (document + len(chunks)) * windows])
        update.commit()
    return index


def exact_top_chunks(exact, query_vectors: np.ndarray, *, windows: int, k: int = 10) -> list[list[int]]:
    """The exact ``k`` best chunk numbers per query (best window per chunk), widening until ``k`` are distinct."""
    out = []
    for vector in query_vectors:
        wanted = k * windows
        while True:
            _, positions = exact.search(vector[None, :], wanted)
            chunks = list(dict.fromkeys(int(p) // windows for p in positions[0] if p >= 0))
            if len(chunks) >= k or wanted >= exact.ntotal:
                break
            wanted *= 4
        out.append(chunks[:k])
    return out


def percentiles(values_ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values_ms, 50)), "p99": float(np.percentile(values_ms, 99)),
            "mean": float(np.mean(values_ms))}


def measure(index: TenantIndex, exact, queries: list[str], query_vectors: np.ndarray, embed_ms: list[float], *,
            windows: int) -> dict:
    """Per query: embed time (measured once) + search and fetch time; recall@10 against exact search."""
    truth = exact_top_chunks(exact, query_vectors, windows=windows)  # chunk numbers; rowid = number + 1
    search_ms, recalls = [], []
    for vector, expected in zip(query_vectors, truth):
        started = time.perf_counter()
        hits = index.search_dense(vector, 10)
        search_ms.append((time.perf_counter() - started) * 1000)
        found = {int(chunk.id, 16) for chunk, _ in hits}  # ids encode the chunk's number
        recalls.append(len(found & set(int(i) for i in expected)) / 10)
    total = [e + s for e, s in zip(embed_ms, search_ms)]
    return {"total_ms": percentiles(total), "search_fetch_ms": percentiles(search_ms),
            "recall@10": float(np.mean(recalls))}


def measure_exact(index: TenantIndex, exact, query_vectors: np.ndarray, embed_ms: list[float], *, windows: int) -> dict:
    search_ms = []
    for vector in query_vectors:
        started = time.perf_counter()
        (chunks,) = exact_top_chunks(exact, vector[None, :], windows=windows)
        index.store.chunks_by_rowid(number + 1 for number in chunks)
        search_ms.append((time.perf_counter() - started) * 1000)
    total = [e + s for e, s in zip(embed_ms, search_ms)]
    return {"total_ms": percentiles(total), "search_fetch_ms": percentiles(search_ms), "recall@10": 1.0}


def main(argv=None) -> int:
    import faiss

    args = parse_args(argv)
    embedder = Embedder(EmbeddingSettings(device=args.device, **({"model": args.model} if args.model else {})))
    questions = json.loads(args.questions.read_text()) if args.questions else load_questions(args.seed)
    centres = embedder.embed_documents(questions[: args.centres])
    queries = questions[args.centres : args.centres + args.queries]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    for q in queries[:10]:  # warm-up
        embedder.embed_query(q)
    embed_ms, query_vectors = [], []
    for q in queries:
        started = time.perf_counter()
        query_vectors.append(embedder.embed_query(q))
        embed_ms.append((time.perf_counter() - started) * 1000)
    query_vectors = np.stack(query_vectors)
    print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()}, faiss threads {faiss.omp_get_max_threads()}")
    print(f"query embedding ({len(queries)} real questions): {percentiles(embed_ms)}")

    report = {"embed_ms": percentiles(embed_ms), "runs": []}
    for size in args.sizes:
        vectors = synthetic_vectors(centres, size * args.windows, noise=args.noise, seed=args.seed)
        exact = None  # built after the first tenant index: holding both while that commits is one copy too many
        for index_type in args.types:
            if index_type == "hnsw" and size > args.hnsw_max_size:
                print(f"{size:>9,} hnsw: skipped (above --hnsw-max-size)")
                continue
            with tempfile.TemporaryDirectory(prefix="lorag-latency-") as tmp:
                faiss.omp_set_num_threads(os.cpu_count())  # build with every core, measure with --threads
                started = time.perf_counter()
                index = build_index(Path(tmp), vectors, windows=args.windows, index_type=index_type, embedder=embedder,
                                    seed=args.seed)
                built = time.perf_counter() - started
                if exact is None:
                    exact = faiss.IndexFlatIP(vectors.shape[1])
                    exact.add(vectors)
                if args.threads:
                    faiss.omp_set_num_threads(args.threads)
                baseline = measure_exact(index, exact, query_vectors, embed_ms, windows=args.windows)
                print(f"\n{size:>9,} chunks x {args.windows} vectors, {index_type}: built (rows + vectors + commit) "
                      f"in {built:.0f} s")
                _print_row("exact (baseline)", baseline, baseline)
                settings = {"hnsw": ("ef_search", args.ef_search), "ivf": ("nprobe", args.nprobe),
                            "flat": ("none", [0])}[index_type]
                for value in settings[1]:
                    if index_type != "flat":
                        setattr(index.vectors, settings[0], value)
                    result = measure(index, exact, queries, query_vectors, embed_ms, windows=args.windows)
                    _print_row(f"{index_type} {settings[0]}={value}", result, baseline)
                    report["runs"].append({"size": size, "windows": args.windows, "index_type": index_type, settings[0]: value,
                                           "build_seconds": round(built), **result, "baseline": baseline})
                index.close()
        del exact, vectors
    print(f"\nload average at the end {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _print_row(label: str, result: dict, baseline: dict) -> None:
    total, search = result["total_ms"], result["search_fetch_ms"]
    speedup = baseline["search_fetch_ms"]["p50"] / search["p50"]
    print(f"  {label:22s} total p50 {total['p50']:6.1f} ms p99 {total['p99']:6.1f} ms | search+fetch p50 "
          f"{search['p50']:6.2f} ms p99 {search['p99']:6.2f} ms | recall@10 {result['recall@10']:.3f} | "
          f"search speed-up vs exact x{speedup:.1f}")


if __name__ == "__main__":
    sys.exit(main())
