"""Vector storage behind a small protocol; FAISS (exact, HNSW or IVF) is the in-process implementation.

Vectors carry int64 ids equal to the chunk store's SQLite rowids, so a search hit joins to its row.
"""

import logging
import math
from pathlib import Path
from typing import Protocol

import numpy as np

from core.atomic import fsync_path
from core.errors import LoragError

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivf")
# Measured by benchmarks/query_latency.py (see benchmarks/RESULTS.md, "Retrieval"), at 100k chunks of 5 window
# vectors each: HNSW efSearch 640 gives chunk recall@10 0.96 (128, enough with one vector per chunk, gives 0.82:
# a chunk's windows are several graph nodes to reach); IVF with sqrt(n) lists and nprobe 16 gives 0.995
# (0.98 at 100k and 0.99 at 1M with one vector per chunk).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 640
IVF_NPROBE = 16

class VectorStore(Protocol):
    """What the tenant index needs from a vector store; a server-grade vector database would be a second one."""

    dimension: int

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` ``(n, dimension)`` float32 under int64 ``ids`` ``(n,)``."""

    def remove(self, ids: np.ndarray) -> None:
        """Drop the vectors stored under ``ids``; unknown ids are ignored."""

    def search(self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search; returns ``(scores, ids)``, each ``(n_queries, k)``, id -1 where fewer hits."""

    def copy(self) -> "VectorStore":
        """An independent copy to stage changes on while readers keep using this one."""

    def save(self, path: Path) -> None:
        """Write durably to ``path`` (the caller renames it into place)."""

class FaissVectorStore:
    """A FAISS index with int64 ids: ``IndexIDMap2(IndexFlatIP)``, ``IndexIDMap2(IndexHNSWFlat)`` or ``IndexIVFFlat``."""

    def __init__(
        self, index, *, index_type: str, dimension: int, ef_search: int = HNSW_EF_SEARCH, nprobe: int = IVF_NPROBE
    ):
        self.index = index  # None only for an IVF store that has not seen its first (training) batch yet
        self.index_type = index_type
        self.dimension = dimension
        self.ef_search = ef_search
        self.nprobe = nprobe

    @classmethod
    def empty(cls, dimension: int, *, index_type: str = "flat", **search_options) -> "FaissVectorStore":
        """A new, empty store. IVF is created untrained and trains on its first batch of vectors."""
        import faiss

        if index_type not in INDEX_TYPES:
            raise LoragError(f"unknown retrieval.index_type {index_type!r}", hint=f"Use one of {', '.join(INDEX_TYPES)}")
        if index_type == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        elif index_type == "hnsw":
            inner = faiss.IndexHNSWFlat(dimension, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index = faiss.IndexIDMap2(inner)
        else:
            index = None  # nlist depends on the first batch's size
        return cls(index, index_type=index_type, dimension=dimension, **search_options)

    @classmethod
    def load(cls, path: Path, *, index_type: str, dimension: int, **search_options) -> "FaissVectorStore":
        """Read a store written by :meth:`save`.

        Raises:
            LoragError: the file does not hold an index of ``dimension``.
        """
        import faiss

        index = faiss.read_index(str(path))
        if index.d != dimension:
            raise LoragError(f"vector file {str(path)!r} has dimension {index.d}, the manifest says {dimension}")
        if index_type == "ivf" and index.ntotal == 0 and not isinstance(index, faiss.IndexIVF):
            index = None  # saved before its first batch: still untrained
        return cls(index, index_type=index_type, dimension=dimension, **search_options)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension or len(ids) != len(vectors):
            raise LoragError(
                f"vectors of shape {vectors.shape} with {len(ids)} ids do not fit an index of dimension {self.dimension}"
            )
        if len(ids) == 0:
            return
        if self.index is None:
            self.index = _trained_ivf(vectors, self.dimension)
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0 or len(self) == 0:
            return
        if self.index_type != "hnsw":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            return
        # HNSW graphs cannot delete nodes: rebuild from the kept vectors (one rebuild per commit).
        stored_ids = faiss.vector_to_array(self.index.id_map)
        vectors = self.index.index.reconstruct_n(0, self.index.ntotal)
        keep = ~np.isin(stored_ids, ids)
        fresh = FaissVectorStore.empty(self.dimension, index_type="hnsw", ef_search=self.ef_search)
        fresh.add(stored_ids[keep], vectors[keep])
        self.index = fresh.index

    def search(self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if len(self) == 0 or k <= 0:
            empty = np.zeros((len(queries), max(k, 0)))
            return empty.astype(np.float32), np.full(empty.shape, -1, dtype=np.int64)
        k = min(k, len(self))
        selector = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
        if self.index_type == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
        elif self.index_type == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        return self.index.search(queries, k, params=params)

    def copy(self) -> "FaissVectorStore":
        import faiss

        clone = FaissVectorStore.__new__(FaissVectorStore)
        clone.__dict__.update(self.__dict__)
        clone.index = None if self.index is None else faiss.clone_index(self.index)
        return clone

    def save(self, path: Path) -> None:
        import faiss

        if self.index is None:  # an IVF store that never saw a vector: save the trivial flat form
            faiss.write_index(faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension)), str(path))
        else:
            faiss.write_index(self.index, str(path))
        fsync_path(path)

def _trained_ivf(vectors: np.ndarray, dimension: int):
    """An IVF index trained on ``vectors``: about sqrt(n) lists, k-means on at most 64 points per list."""
    import faiss

    n = len(vectors)
    nlist = max(1, min(int(math.sqrt(n)), n // 39 or 1, 65536))
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.max_points_per_centroid = 64  # faiss subsamples (seeded) beyond this: bounded training time
    index.train(vectors)
    log.info("IVF index trained with %d lists on %d vectors", nlist, n)
    return index
