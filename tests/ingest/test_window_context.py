"""Each chunk knows its document's title and heading path, and retrieval uses them: a question that names "the
2024 policy" reaches the 2024 document even where its sections never repeat the year."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.records import Chunk
from core.settings import ChunkingSettings, RetrievalSettings
from ingest.chunking import Chunker, context_line
from ingest.loaders import Page, load_document, markdown_sections, readable_stem
from ingest.pipeline import embed_chunks, ingest_paths
from ingest.settings import IngestSettings
from tests.conftest import SAMPLE_DOCS
from tests.ingest.conftest import make_settings
from tests.ingest.pdf_pages import write_pdf

POLICIES = Path(__file__).resolve().parent / "policies"  # the same sections in both years; only "Scope" names it
QUESTIONS = [
    "What is the nightly hotel cap in capital cities under the {year} travel policy?",
    "How much is the daily meal allowance in the {year} policy?",
    "What mileage rate per kilometre does the {year} travel policy refund?",
    "Above what trip cost is a department head's approval needed under the {year} policy?",
    "Within how many days are expense reports due according to the {year} travel policy?",
]


def test_titles_come_from_the_document_else_from_its_file_name(tmp_path):
    limits = IngestSettings()
    titles = {
        "handbook/maintenance.md": "Kestrel Tide Maintenance Guide",  # the first heading
        "support/faq.html": "Kestrel Cloud - Frequently Asked Questions",  # <title>
        "specs/kestrel-tide-datasheet.pdf": "Kestrel Tide KT-300 Datasheet",  # PDF metadata
        "policies/returns-and-warranty.txt": "Kestrel Instruments Ltd. - Returns and Warranty Policy",  # first line
    }
    for name, title in titles.items():
        assert load_document(SAMPLE_DOCS / name, settings=limits).title == title
    # A filing number as the metadata title, or none, and a first line that is a sentence: the file name.
    pdf = write_pdf(tmp_path / "AMCOR_2023_10K.pdf", [["Revenue rose."]], title="0000004962-23-000006")
    assert load_document(pdf, settings=limits).title == "AMCOR 2023 10K"
    (tmp_path / "pump-notes_v2.txt").write_text("The pump runs at 40 litres per minute.\n")
    assert load_document(tmp_path / "pump-notes_v2.txt", settings=limits).title == "pump notes v2"
    assert readable_stem(Path("KT-300_quick-start.md")) == "KT-300 quick start"


def test_the_context_line_names_the_title_and_the_innermost_headings():
    assert context_line("Guide", ("Guide", "Calibration", "pH")) == "Guide > Calibration > pH"  # "# Guide" once
    assert context_line("Guide", ("Part I", "Sensors", "Oxygen")) == "Guide > Sensors > Oxygen"
    assert context_line("Datasheet", ()) == "Datasheet"
    assert context_line("", ("Setup",)) == "Setup"


def test_a_chunk_carries_its_context_line_beside_its_text(embedder):
    text = "# Pumps\n\nThe pump runs at 40 litres per minute. It needs no priming."
    page = Page(1, text, markdown_sections(text))
    chunker = Chunker(embedder.tokenizer, ChunkingSettings(window_tokens=12))
    (chunk,) = chunker.split_pages([page], tenant="t", document_id="d", source="s", title="Pump Manual 2024")
    assert chunk.context == "Pump Manual 2024 > Pumps"
    assert page.text[chunk.start : chunk.end] == chunk.text and "2024" not in chunk.text
    assert chunk.embedded_texts() == [text[start:end] for start, end in chunk.windows]
    plain = Chunker(embedder.tokenizer, ChunkingSettings(window_tokens=12, window_context=False))
    (without,) = plain.split_pages([page], tenant="t", document_id="d", source="s", title="Pump Manual 2024")
    assert without.context == "" and without.embedded_texts() == chunk.embedded_texts()
    assert without.id == chunk.id  # the context is not part of what a chunk is


def test_each_window_vector_holds_a_fixed_share_of_the_context_vector(embedder):
    chunk = Chunk("i", "t", "d", "s", 1, 0, 43, "The pump runs at 40 litres. It never stops.",
                  windows=((0, 27), (28, 43)), context="Pump Manual 2024 > Pumps")
    windows = embedder.embed_documents(chunk.embedded_texts())
    (context,) = embedder.embed_documents([chunk.context])
    mixed = embed_chunks(embedder, [chunk, replace(chunk, context="")], context_weight=0.15)
    expected = windows + 0.15 * context
    np.testing.assert_allclose(mixed[:2], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(mixed[2:], windows, atol=1e-6)  # no context line: the window's own vector
    np.testing.assert_allclose(embed_chunks(embedder, [chunk], context_weight=0), windows, atol=1e-6)


@pytest.fixture(scope="module")
def policy_retriever(tmp_path_factory, embedder):
    from retrieval.index import TenantIndex
    from retrieval.retriever import HybridRetriever

    settings = make_settings(tmp_path_factory.mktemp("policies"))
    assert ingest_paths([POLICIES], tenant="hr", settings=settings, embedder=embedder).count("added") == 2
    index = TenantIndex.open(settings.data_dir, "hr", embedder_name=embedder.name, dimension=embedder.dimension)
    yield HybridRetriever(index, embedder, RetrievalSettings())
    index.close()


def test_ingest_stores_the_context_line_and_vectors_that_hold_it(policy_retriever, embedder):
    index = policy_retriever.index
    meals = [c for c in index.chunks_of(index.documents()[0].document_id) if "meal allowance" in c.text]
    assert [c.context for c in meals] == ["Northwind Travel and Expense Policy 2024 > Meals"]
    (window,) = embed_chunks(embedder, meals[:1], context_weight=0.15)[:1]
    hit, score = index.search_dense(window, 1)[0]
    assert hit == meals[0] and score == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("year", [2024, 2025])
def test_a_question_naming_the_year_finds_that_years_policy_first(policy_retriever, year):
    tops = [Path(policy_retriever.retrieve(q.format(year=year), k=1)[0].chunk.source).name for q in QUESTIONS]
    assert tops == [f"travel-policy-{year}.md"] * len(QUESTIONS)
