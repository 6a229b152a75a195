"""Shared fixtures for retrieval tests: the real embedder (loaded once) and a hand-written corpus."""

import hashlib

import numpy as np
import pytest

from retrieval.embedder import Embedder
from retrieval.index import TenantIndex
from core.settings import EmbeddingSettings
from core.records import Chunk, DocumentRecord

# Each document: source -> (heading, paragraphs); one chunk per paragraph, all on page 1 except where noted.
CORPUS = {
    "handbook/warranty.md": ("Warranty", [
        "Every Kestrel thermometer is covered by a two-year warranty against manufacturing defects.",
        "The warranty does not cover damage caused by dropping the device or by using the wrong batteries.",
        "To claim the warranty, send the device with the original receipt to the service centre in Leeds.",
    ]),
    "handbook/calibration.md": ("Calibration", [
        "Calibrate the probe once a month in an ice bath at zero degrees Celsius.",
        "If the reading drifts by more than half a degree, replace the probe with part number QX-7731B.",
        "Calibration records must be kept for three years for audits.",
    ]),
    "recipes/bread.txt": ("Bread", [
        "Sourdough bread needs a lively starter, flour, water and salt.",
        "Bake the loaf at 230 degrees for twenty minutes with steam, then forty minutes without.",
    ]),
    "travel/norway.txt": ("Norway", [
        "The fjords of western Norway are best visited in early summer when the waterfalls are full.",
        "Trains from Oslo to Bergen cross the Hardanger plateau in about seven hours.",
    ]),
}


def chunk_id(tenant: str, source: str, number: int, text: str) -> str:
    return hashlib.sha256(f"{tenant}|{source}|{number}|{text}".encode()).hexdigest()[:32]


def make_document(tenant: str, source: str, heading: str, paragraphs: list[str]):
    """A DocumentRecord and its chunks, with character spans as if the paragraphs were one page of text."""
    document_id = hashlib.sha256(("\n\n".join(paragraphs) + source).encode()).hexdigest()[:32]
    chunks, offset = [], 0
    for number, text in enumerate(paragraphs):
        chunks.append(Chunk(
            id=chunk_id(tenant, source, number, text), tenant=tenant, document_id=document_id, source=source,
            page=1 + number // 2, start=offset, end=offset + len(text), text=text, heading_path=(heading,),
        ))
        offset += len(text) + 2
    record = DocumentRecord(document_id, tenant, source, pages=1 + (len(paragraphs) - 1) // 2,
                            chunk_count=len(chunks), size_bytes=offset, ingested_at="2026-01-01T00:00:00+00:00")
    return record, chunks


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(EmbeddingSettings())


@pytest.fixture(scope="session")
def corpus_vectors(embedder) -> dict[str, np.ndarray]:
    """Embeddings of every CORPUS paragraph, computed once per session."""
    return {source: embedder.embed_documents(paragraphs) for source, (_, paragraphs) in CORPUS.items()}


@pytest.fixture
def build_index(data_dir, embedder, corpus_vectors):
    """``build_index(sources=None, *, tenant="acme", index_type="flat")``: an index holding those CORPUS documents."""

    def build(sources=None, *, tenant: str = "acme", index_type: str = "flat") -> TenantIndex:
        index = TenantIndex.open(data_dir, tenant, embedder_name=embedder.name, dimension=embedder.dimension,
                                 index_type=index_type)
        with index.update() as update:
            for source in sources or CORPUS:
                heading, paragraphs = CORPUS[source]
                record, chunks = make_document(tenant, source, heading, paragraphs)
                update.put_document(record, chunks, corpus_vectors[source])
            update.commit()
        return index

    return build
