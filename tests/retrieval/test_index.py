import json
from dataclasses import replace

import numpy as np
import pytest

from core.errors import Conflict, LoragError, NotFound
from retrieval.index import TenantIndex
from tests.retrieval.conftest import CORPUS, make_document


def reopen(index: TenantIndex, embedder, **options) -> TenantIndex:
    return TenantIndex.open(index.directory.parents[2], index.tenant, embedder_name=embedder.name,
                            dimension=embedder.dimension, **options)


def test_save_then_load_gives_back_the_same_index(build_index, embedder, corpus_vectors):
    index = build_index()
    loaded = reopen(index, embedder)

    assert len(loaded) == len(index) == sum(len(p) for _, p in CORPUS.values())
    assert loaded.documents() == index.documents()
    assert [d.source for d in loaded.documents()] == sorted(CORPUS)
    for record in index.documents():
        assert loaded.chunks_of(record.document_id) == index.chunks_of(record.document_id)
        assert record.chunk_count == len(CORPUS[record.source][1])
    query = corpus_vectors["recipes/bread.txt"][1]
    assert loaded.search_dense(query, 3) == index.search_dense(query, 3)
    assert loaded.search_dense(query, 1)[0][0].text == CORPUS["recipes/bread.txt"][1][1]
    assert loaded.search_dense(query, 1)[0][1] == pytest.approx(1.0, abs=1e-5)
    assert loaded.manifest == index.manifest
    assert loaded.manifest.format_version == 2 and loaded.manifest.dimension == embedder.dimension


def test_chunks_keep_their_metadata(build_index):
    index = build_index()
    record = index.document_by_source("handbook/calibration.md")
    chunks = index.chunks_of(record.document_id)
    assert [c.text for c in chunks] == CORPUS["handbook/calibration.md"][1]
    assert [c.page for c in chunks] == [1, 1, 2]
    assert chunks[1].start == len(chunks[0].text) + 2 and chunks[1].end - chunks[1].start == len(chunks[1].text)
    assert chunks[2].heading_path == ("Calibration",)
    assert index.chunk(chunks[1].id) == chunks[1]
    assert index.chunk("no-such-chunk") is None
    assert index.document(record.document_id) == record
    assert index.document("nope") is None and index.document_by_source("nope") is None


def test_different_embedder_is_refused_with_a_fix(build_index, embedder, data_dir):
    build_index()
    with pytest.raises(Conflict, match="re-ingest into a fresh tenant") as error:
        TenantIndex.open(data_dir, "acme", embedder_name="other-model", dimension=embedder.dimension)
    assert "other-model" in str(error.value) and "embedding.model" in str(error.value)
    with pytest.raises(Conflict, match="dimension 768"):
        TenantIndex.open(data_dir, "acme", embedder_name=embedder.name, dimension=768)


def test_missing_index_is_not_found_unless_created(data_dir):
    with pytest.raises(NotFound, match="lorag ingest"):
        TenantIndex.open(data_dir, "ghost", embedder_name="e", dimension=4, create=False)
    created = TenantIndex.open(data_dir, "ghost", embedder_name="e", dimension=4)
    assert len(created) == 0 and created.documents() == [] and created.search_dense(np.ones(4), 5) == []
    assert created.search_keyword("anything", 5) == []
    assert TenantIndex.open(data_dir, "ghost", embedder_name="e", dimension=4, create=False).generation == 0


def test_bad_index_type_and_tenant_name_are_refused(data_dir):
    with pytest.raises(LoragError, match="index_type 'annoy'"):
        TenantIndex.open(data_dir, "acme", embedder_name="e", dimension=4, index_type="annoy")
    with pytest.raises(LoragError, match="invalid tenant name"):
        TenantIndex.open(data_dir, "../etc", embedder_name="e", dimension=4)


def test_put_document_replaces_the_same_source(build_index, corpus_vectors):
    index = build_index()
    before = len(index)
    record, chunks = make_document("acme", "recipes/bread.txt", "Bread", ["Rye bread is dense and dark."])
    with index.update() as update:
        update.put_document(record, chunks, corpus_vectors["recipes/bread.txt"][:1])
        update.commit()

    assert len(index) == before - 1
    assert index.document_by_source("recipes/bread.txt").chunk_count == 1
    assert [c.text for c in index.chunks_of(record.document_id)] == ["Rye bread is dense and dark."]
    texts = [c.text for c, _ in index.search_dense(corpus_vectors["recipes/bread.txt"][0], len(index))]
    assert "Sourdough bread needs a lively starter, flour, water and salt." not in texts
    assert len(texts) == len(index)


def test_remove_source(build_index, corpus_vectors):
    index = build_index()
    with index.update() as update:
        assert update.remove_source("travel/norway.txt") is True
        assert update.remove_source("travel/norway.txt") is False
        assert update.remove_source("never/ingested.txt") is False
        update.commit()
    assert index.document_by_source("travel/norway.txt") is None
    hits = index.search_dense(corpus_vectors["travel/norway.txt"][0], 100)
    assert len(hits) == len(index) and all(c.source != "travel/norway.txt" for c, _ in hits)


def test_leaving_without_commit_discards(build_index, embedder):
    index = build_index()
    with index.update() as update:
        update.remove_source("travel/norway.txt")
    assert index.document_by_source("travel/norway.txt") is not None
    assert reopen(index, embedder).document_by_source("travel/norway.txt") is not None
    with pytest.raises(LoragError, match="already committed or discarded"):
        update.remove_source("recipes/bread.txt")


def test_bad_vectors_are_refused(build_index, corpus_vectors):
    index = build_index(["recipes/bread.txt"])
    record, chunks = make_document("acme", "x.txt", "X", ["one", "two"])
    with index.update() as update, pytest.raises(LoragError, match=r"shape \(2, 384\)"):
        update.put_document(record, chunks, corpus_vectors["recipes/bread.txt"][:1])
    other_record, other_chunks = make_document("other", "x.txt", "X", ["one", "two"])
    with index.update() as update, pytest.raises(LoragError, match="tenant 'other'"):
        update.put_document(other_record, other_chunks, corpus_vectors["travel/norway.txt"])
    with pytest.raises(LoragError, match="dimension 3"):
        index.search_dense(np.ones(3), 2)


def test_neighbours_in_reading_order(build_index):
    index = build_index()
    chunks = index.chunks_of(index.document_by_source("handbook/warranty.md").document_id)
    assert index.neighbours(chunks[1].id) == chunks
    assert index.neighbours(chunks[0].id, before=1, after=1) == chunks[:2]
    assert index.neighbours(chunks[2].id, before=2, after=0) == chunks
    assert index.neighbours(chunks[1].id, before=0, after=0) == [chunks[1]]
    assert index.neighbours("unknown") == []


def test_source_filter(build_index, corpus_vectors):
    index = build_index()
    query = corpus_vectors["handbook/warranty.md"][0]
    hits = index.search_dense(query, 10, sources=["recipes/bread.txt", "travel/norway.txt"])
    assert {c.source for c, _ in hits} == {"recipes/bread.txt", "travel/norway.txt"} and len(hits) == 4
    assert index.search_dense(query, 10, sources=["not/there"]) == []
    keyword = index.search_keyword("warranty degrees", 10, sources=["recipes/bread.txt"])
    assert [c.text for c, _ in keyword] == [CORPUS["recipes/bread.txt"][1][1]]


def test_keyword_search_finds_an_exact_rare_term(build_index):
    index = build_index()
    hits = index.search_keyword("QX-7731B", 5)
    assert hits[0][0].text == CORPUS["handbook/calibration.md"][1][1] and hits[0][1] > 0
    assert index.search_keyword("xylophone", 5) == []


def test_term_weights_are_bm25_idf_over_the_tenants_chunks(build_index):
    """A question's words weighted by rarity among the tenant's chunks: a word no chunk holds weighs most, a word
    in every chunk of one document less, and a passage covering the rare words covers most of the weight."""
    from retrieval.keyword import idf

    index = build_index()
    weights = index.term_weights("Is the Hardanger warranty on an iPhone?")
    assert set(weights.weights) == {"hardang", "warranti", "iphon"}  # stemmed, stop words out
    chunks = len(index)
    assert weights.weights["iphon"] == pytest.approx(idf(0, chunks))  # no chunk says it: the most weight
    assert weights.weights["hardang"] == pytest.approx(idf(1, chunks))
    assert weights.weights["warranti"] == pytest.approx(idf(3, chunks))  # the three warranty chunks
    assert weights.weights["iphon"] > weights.weights["hardang"] > weights.weights["warranti"]
    held = weights.held(["Trains cross the Hardanger plateau.", "The warranty lasts two years.", "Bake the loaf."])
    assert held == [{"hardang"}, {"warranti"}, set()]
    rail, warranty, none = map(weights.share, held)
    total = sum(weights.weights.values())
    assert rail == pytest.approx(weights.weights["hardang"] / total)
    assert warranty == pytest.approx(weights.weights["warranti"] / total) and none == 0.0
    assert index.term_weights("the of and").weights == {}  # no term at all: nothing to weigh


def test_refresh_sees_another_writers_commit(build_index, embedder, corpus_vectors):
    reader = build_index(["recipes/bread.txt"])
    writer = reopen(reader, embedder)
    record, chunks = make_document("acme", "travel/norway.txt", *CORPUS["travel/norway.txt"])
    with writer.update() as update:
        update.put_document(record, chunks, corpus_vectors["travel/norway.txt"])
        update.commit()

    assert len(reader) == 2 and reader.refresh() is True and reader.refresh() is False
    assert len(reader) == 4 and reader.generation == writer.generation
    assert reader.search_dense(corpus_vectors["travel/norway.txt"][1], 1)[0][0] == chunks[1]
    assert reader.search_keyword("Hardanger", 1)[0][0] == chunks[1]  # the keyword index follows the generation
    # The stale reader writes on top of the newest commit, not of the state it had loaded.
    stale = reopen(reader, embedder)
    with writer.update() as update:
        update.remove_source("recipes/bread.txt")
        update.commit()
    with stale.update() as update:
        update.put_document(*make_document("acme", "handbook/warranty.md", *CORPUS["handbook/warranty.md"]),
                            corpus_vectors["handbook/warranty.md"])
        update.commit()
    final = reopen(reader, embedder)
    assert [d.source for d in final.documents()] == ["handbook/warranty.md", "travel/norway.txt"]
    assert len(final) == 5 and len(final.search_dense(corpus_vectors["recipes/bread.txt"][0], 10)) == 5


def test_tenants_are_isolated(build_index, corpus_vectors):
    acme = build_index(["handbook/calibration.md"], tenant="acme")
    globex = build_index(["recipes/bread.txt"], tenant="globex")
    hits = globex.search_dense(corpus_vectors["handbook/calibration.md"][1], 10)
    assert hits and all(c.tenant == "globex" and c.source == "recipes/bread.txt" for c, _ in hits)
    assert globex.search_keyword("QX-7731B probe", 10) == []
    assert globex.search_dense(corpus_vectors["recipes/bread.txt"][0], 10, sources=["handbook/calibration.md"]) == []
    assert globex.chunk(acme.chunks_of(acme.documents()[0].document_id)[0].id) is None
    assert acme.directory != globex.directory


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_index_types_support_the_same_operations(build_index, embedder, corpus_vectors, index_type):
    index = build_index(index_type=index_type)
    query = corpus_vectors["handbook/warranty.md"][2]
    assert index.search_dense(query, 1)[0][0].text == CORPUS["handbook/warranty.md"][1][2]
    with index.update() as update:
        update.remove_source("handbook/warranty.md")
        update.commit()
    loaded = reopen(index, embedder, index_type=index_type)
    assert loaded.manifest.index_type == index_type and len(loaded) == len(index) == 7
    hits = loaded.search_dense(query, 10, sources=["handbook/calibration.md"])
    assert {c.source for c, _ in hits} == {"handbook/calibration.md"}
    assert all(c.source != "handbook/warranty.md" for c, _ in loaded.search_dense(query, 10))


def windowed_document(tenant: str, source: str, heading: str, paragraphs: list[str]):
    """One chunk holding all ``paragraphs``, each paragraph one embedded window."""
    record, chunks = make_document(tenant, source, heading, ["\n\n".join(paragraphs)])
    chunk, windows, offset = chunks[0], [], chunks[0].start
    for paragraph in paragraphs:
        windows.append((offset, offset + len(paragraph)))
        offset += len(paragraph) + 2
    return record, [replace(chunk, windows=tuple(windows))]


def test_a_chunk_with_windows_scores_by_its_best_window_and_is_returned_once(build_index, embedder,
                                                                            corpus_vectors):
    index = build_index(["recipes/bread.txt", "travel/norway.txt"])
    record, chunks = windowed_document("acme", "handbook/warranty.md", *CORPUS["handbook/warranty.md"])
    assert chunks[0].embedded_texts() == CORPUS["handbook/warranty.md"][1]
    with index.update() as update:
        update.put_document(record, chunks, corpus_vectors["handbook/warranty.md"])  # 3 windows, 3 vectors
        update.commit()
    assert len(index) == 5 and len(index.vectors) == 7 == index.store.vector_total()

    for window in range(3):
        hits = index.search_dense(corpus_vectors["handbook/warranty.md"][window], 10)
        assert hits[0][0] == chunks[0] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == 5 and len({c.id for c, _ in hits}) == 5  # every chunk once, not every window
    assert [c for c, _ in index.search_dense(corpus_vectors["handbook/warranty.md"][1], 10,
                                             sources=["handbook/warranty.md"])] == chunks
    assert reopen(index, embedder).chunks_of(record.document_id) == chunks  # windows survive reload


def test_replacing_or_removing_a_windowed_chunk_drops_all_its_vectors(build_index, corpus_vectors):
    index = build_index(["recipes/bread.txt"])
    record, chunks = windowed_document("acme", "handbook/warranty.md", *CORPUS["handbook/warranty.md"])
    with index.update() as update:
        update.put_document(record, chunks, corpus_vectors["handbook/warranty.md"])
        update.commit()
    shorter, short_chunks = windowed_document("acme", "handbook/warranty.md", "Warranty",
                                              CORPUS["handbook/warranty.md"][1][:2])
    with index.update() as update:
        update.put_document(shorter, short_chunks, corpus_vectors["handbook/warranty.md"][:2])
        update.commit()
    assert len(index.vectors) == 2 + 2 == index.store.vector_total()
    hits = index.search_dense(corpus_vectors["handbook/warranty.md"][2], 10)
    assert [c for c, _ in hits if c.source == "handbook/warranty.md"] == short_chunks
    with index.update() as update:
        update.remove_source("handbook/warranty.md")
        update.commit()
    assert len(index.vectors) == 2 and {c.source for c, _ in index.search_dense(corpus_vectors[
        "handbook/warranty.md"][0], 10)} == {"recipes/bread.txt"}


def test_window_vectors_must_match_the_windows(build_index, corpus_vectors):
    index = build_index(["recipes/bread.txt"])
    record, chunks = windowed_document("acme", "handbook/warranty.md", *CORPUS["handbook/warranty.md"])
    with index.update() as update, pytest.raises(LoragError, match=r"3 embedded texts need vectors of shape \(3, 384\)"):
        update.put_document(record, chunks, corpus_vectors["handbook/warranty.md"][:1])


def test_an_index_of_the_previous_format_is_refused_with_what_to_do(build_index, embedder):
    index = build_index(["recipes/bread.txt"])
    manifest = index.directory / "manifest.json"
    raw = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(raw | {"format_version": 1}))
    with pytest.raises(LoragError, match=r"older lorag \(format 1: one vector per chunk\).*ingest the documents "
                                         r"again") as refused:
        reopen(index, embedder)
    assert str(index.directory) in str(refused.value)
    manifest.write_text(json.dumps(raw | {"format_version": 3}))
    with pytest.raises(LoragError, match="format_version 3, this lorag reads 2"):
        reopen(index, embedder)


def test_search_widens_when_one_chunk_fills_the_first_window_hits(build_index, corpus_vectors):
    index = build_index(["recipes/bread.txt"])
    query = corpus_vectors["travel/norway.txt"][0]
    text = " ".join(["fjord"] * 12)
    record, chunks = make_document("acme", "travel/norway.txt", "Norway", [text])
    windows = tuple((start, start + 5) for start in range(0, len(text), 6))  # 12 windows, all nearest the query
    chunks = [replace(chunks[0], windows=windows)]
    with index.update() as update:
        update.put_document(record, chunks, np.repeat(query[None, :], 12, axis=0))
        update.commit()
    hits = index.search_dense(query, 2)  # the first 8 window hits are all the fjord chunk's
    assert [c.source for c, _ in hits] == ["travel/norway.txt", "recipes/bread.txt"]


def test_an_index_from_before_chunk_contexts_keeps_working_and_takes_new_ones(build_index, embedder, corpus_vectors):
    import sqlite3

    from retrieval.index import STORE_NAME

    index = build_index(["handbook/warranty.md", "recipes/bread.txt"])
    index.close()
    with sqlite3.connect(index.directory / STORE_NAME) as connection:  # the chunks table as written before contexts
        connection.executescript("""
            ALTER TABLE chunks RENAME TO chunks_now;
            CREATE TABLE chunks (rowid INTEGER PRIMARY KEY AUTOINCREMENT, chunk_id TEXT NOT NULL, source TEXT NOT NULL,
                document_id TEXT NOT NULL, ordinal INTEGER NOT NULL, page INTEGER NOT NULL, start INTEGER NOT NULL,
                "end" INTEGER NOT NULL, text TEXT NOT NULL, heading_path TEXT NOT NULL, windows TEXT NOT NULL);
            INSERT INTO chunks SELECT rowid, chunk_id, source, document_id, ordinal, page, start, "end", text,
                heading_path, windows FROM chunks_now;
            DROP TABLE chunks_now;
        """)
    old = reopen(index, embedder)
    record = old.document_by_source("handbook/warranty.md")
    assert [c.text for c in old.chunks_of(record.document_id)] == CORPUS["handbook/warranty.md"][1]
    assert all(c.context == "" for c in old.chunks_of(record.document_id))
    assert old.search_dense(corpus_vectors["recipes/bread.txt"][0], 1)[0][0].source == "recipes/bread.txt"
    assert old.search_keyword("receipt service centre", 1)[0][0].source == "handbook/warranty.md"

    # A new ingest adds the column; a reader opened before it sees the new contexts after its refresh.
    record, chunks = make_document("acme", "handbook/calibration.md", *CORPUS["handbook/calibration.md"])
    chunks = [replace(chunk, context="Kestrel Lab Handbook > Calibration") for chunk in chunks]
    with reopen(index, embedder).update() as update:
        update.put_document(record, chunks, corpus_vectors["handbook/calibration.md"])
        update.commit()
    assert old.refresh()
    assert old.chunks_of(record.document_id) == chunks
    assert all(c.context == "" for c in old.chunks_of(old.document_by_source("handbook/warranty.md").document_id))
    # The keyword index reads the context line too: "Lab Handbook" is in no chunk text.
    assert {c.source for c, _ in old.search_keyword("lab handbook", 10)} == {"handbook/calibration.md"}


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_export_reads_back_every_documents_vectors(build_index, corpus_vectors, index_type):
    """export_document (what `lorag db copy-tenant` moves) gives each document's vectors as stored, for every index
    type: IVF lists are read through one id-mapped copy of the loaded index, made once, not per document."""
    index = build_index(index_type=index_type)
    mapped = []
    for source, vectors in corpus_vectors.items():
        record, chunks, exported = index.export_document(source)
        assert record.source == source and [c.source for c in chunks] == [source] * len(chunks)
        np.testing.assert_allclose(exported, vectors, atol=1e-5)
        mapped.append(index._readable)
    if index_type == "ivf":
        assert mapped[0] is not None and all(m is mapped[0] for m in mapped)  # one copy for the whole export
    assert index.export_document("no/such.md") is None
