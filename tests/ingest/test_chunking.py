"""Chunk spans are exact, chunks fit the embedder window, ids are stable content hashes."""

import pytest

from ingest.chunking import Chunker, chunk_id_of
from ingest.discovery import discover_files
from ingest.loaders import Page, load_document
from ingest.settings import IngestSettings
from core.errors import LoragError
from core.settings import ChunkingSettings
from tests.conftest import SAMPLE_DOCS


@pytest.fixture(scope="module")
def chunker(embedder):
    return Chunker(embedder.tokenizer, ChunkingSettings(chunk_tokens=64, overlap_tokens=8))


def test_every_sample_chunk_is_an_exact_span_of_its_page(embedder, chunker):
    files = discover_files([SAMPLE_DOCS]).files
    assert {path.suffix for path in files} >= {".md", ".txt", ".html", ".pdf"}
    for path in files:
        document = load_document(path, settings=IngestSettings())
        pages = {page.number: page.text for page in document.pages}
        chunks = list(chunker.split_pages(document.pages, tenant="acme", document_id="d1", source=str(path)))
        assert chunks, path
        for chunk in chunks:
            assert pages[chunk.page][chunk.start : chunk.end] == chunk.text
            assert chunk.text.strip() == chunk.text and chunk.text
            assert embedder.count_tokens(chunk.text) <= 64
            assert (chunk.tenant, chunk.document_id, chunk.source) == ("acme", "d1", str(path))
        # Reading order: pages ascending, starts ascending within a page.
        assert [(c.page, c.start) for c in chunks] == sorted((c.page, c.start) for c in chunks)


def test_pdf_chunks_carry_their_page_number(chunker):
    document = load_document(SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf", settings=IngestSettings())
    chunks = list(chunker.split_pages(document.pages, tenant="t", document_id="d", source="s"))
    pages_of = {fact: {c.page for c in chunks if fact in c.text} for fact in ("18.5 kg", "0.1 mg/L", "310 EUR")}
    assert pages_of == {"18.5 kg": {1}, "0.1 mg/L": {2}, "310 EUR": {4}}


def test_markdown_chunks_carry_heading_paths(chunker):
    document = load_document(SAMPLE_DOCS / "handbook" / "maintenance.md", settings=IngestSettings())
    chunks = list(chunker.split_pages(document.pages, tenant="t", document_id="d", source="s"))
    (ph,) = [c for c in chunks if "every 90 days" in c.text]
    assert ph.heading_path == ("Kestrel Tide Maintenance Guide", "Calibration", "pH calibration")
    # A heading with no text of its own ("## Calibration") is joined to the section after it.
    assert not any(c.text.strip() == "## Calibration" for c in chunks)


def test_long_text_is_split_with_overlap_and_ids_are_stable(embedder, chunker):
    text = " ".join(f"Sentence number {i} describes buoy maintenance." for i in range(200))
    page = Page(1, text)
    first = list(chunker.split_pages([page], tenant="t", document_id="d", source="s"))
    second = list(chunker.split_pages([page], tenant="t", document_id="d", source="s"))
    assert len(first) > 5 and [c.id for c in first] == [c.id for c in second]
    assert len({c.id for c in first}) == len(first)
    assert all(a.start < b.start < a.end for a, b in zip(first, first[1:]))  # consecutive chunks overlap
    assert first[0].id == chunk_id_of("t", "d", 1, first[0].start, first[0].end, first[0].text)
    assert chunk_id_of("other", "d", 1, first[0].start, first[0].end, first[0].text) != first[0].id


def test_gigantic_single_line_is_split_into_exact_spans(embedder, chunker):
    for text in ("x" * 100_000, "alpha " * 30_000):
        spans = list(chunker.spans(text, 0, len(text)))
        assert len(spans) > 100
        assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())
        assert all(embedder.count_tokens(text[s:e]) <= 64 for s, e in spans[:: max(1, len(spans) // 20)])


def test_overlap_must_be_smaller_than_chunk(embedder):
    with pytest.raises(LoragError, match="overlap_tokens"):
        Chunker(embedder.tokenizer, ChunkingSettings(chunk_tokens=32, overlap_tokens=32))


def test_windows_are_sentence_spans_of_the_chunk_within_the_window_size(embedder):
    chunker = Chunker(embedder.tokenizer, ChunkingSettings(chunk_tokens=200, overlap_tokens=30, window_tokens=24))
    text = (
        "The buoy reports dissolved oxygen every ten minutes. Its probe is accurate to 0.1 mg/L between 0 and "
        "20 degrees, and drifts less than 1% per month. Replace it yearly.\n\nCalibration\n\n"
        + "a verylongsentencewithoutanyperiod " * 12
    )
    (chunk,) = chunker.split_pages([Page(1, text)], tenant="t", document_id="d", source="s")
    texts = chunk.embedded_texts()
    assert len(texts) == len(chunk.windows) > 3
    # The second sentence is longer than a window: it is cut between words, its head joining the first one.
    assert texts[0].startswith("The buoy reports dissolved oxygen every ten minutes. Its probe")
    assert texts[1].startswith("20 degrees") and "Replace it yearly.\n\nCalibration" in texts[1]
    for (start, end), window in zip(chunk.windows, texts):
        assert text[start:end] == window and window == window.strip() and window
        assert embedder.count_tokens(window) <= 24
    # In order, without overlap, and together they hold every word of the chunk.
    assert all(a[1] <= b[0] for a, b in zip(chunk.windows, chunk.windows[1:]))
    assert " ".join(texts).split() == chunk.text.split()


def test_window_tokens_zero_embeds_the_whole_chunk(embedder):
    chunker = Chunker(embedder.tokenizer, ChunkingSettings(window_tokens=0))
    (chunk,) = chunker.split_pages([Page(1, "One sentence. Another one.")], tenant="t", document_id="d", source="s")
    assert chunk.windows == () and chunk.embedded_texts() == ["One sentence. Another one."]
