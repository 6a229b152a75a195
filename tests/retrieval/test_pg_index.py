"""The PostgreSQL tenant index against a real server: the file store's answers, writes and refusals."""

import numpy as np
import pytest

from core.errors import Conflict, LoragError, NotFound
from core.settings import RetrievalSettings
from retrieval.pg.database import shared_database
from retrieval.pg.index import PgTenantIndex
from retrieval.retriever import HybridRetriever
from tests.retrieval.conftest import CORPUS, make_document

QUERIES = ["how long is the warranty?", "QX-7731B probe replacement", "bake sourdough with steam",
           "train from Oslo to Bergen", "calibration records audits", "zero degrees ice bath"]


@pytest.fixture
def build_pg_index(postgres_dsn, embedder, corpus_vectors):
    """``build_pg_index(sources=None, *, tenant="acme")``: a PostgreSQL index holding those CORPUS documents."""
    database = shared_database(postgres_dsn)

    def build(sources=None, *, tenant: str = "acme") -> PgTenantIndex:
        index = PgTenantIndex.open(database, tenant, embedder_name=embedder.name, dimension=embedder.dimension)
        with index.update() as update:
            for source in sources or CORPUS:
                heading, paragraphs = CORPUS[source]
                update.put_document(*make_document(tenant, source, heading, paragraphs), corpus_vectors[source])
            update.commit()
        return index

    return build


class QueryEmbedder:
    def __init__(self, embedder):
        self.embedder = embedder

    def embed_query(self, text):
        return self.embedder.embed_query(text)


def test_answers_match_the_file_store(build_pg_index, build_index, embedder):
    files, pg = build_index(), build_pg_index()
    assert pg.documents() == files.documents() and len(pg) == len(files) == 10
    for query in QUERIES:
        vector = embedder.embed_query(query)
        dense_files, dense_pg = files.search_dense(vector, 5), pg.search_dense(vector, 5)
        assert [c for c, _ in dense_pg] == [c for c, _ in dense_files], query
        assert [s for _, s in dense_pg] == pytest.approx([s for _, s in dense_files], abs=1e-5)
        # The rarity of the query's words, which answerability weighs them by: the same in both stores.
        assert pg.term_weights(query).weights == pytest.approx(files.term_weights(query).weights, rel=1e-9), query
        keyword_files, keyword_pg = files.search_keyword(query, 5), pg.search_keyword(query, 5)
        assert [c for c, _ in keyword_pg] == [c for c, _ in keyword_files], query  # BM25 reproduced exactly
        assert [s for _, s in keyword_pg] == pytest.approx([s for _, s in keyword_files], rel=1e-6)
        settings = RetrievalSettings(k=4)
        hybrid_files = HybridRetriever(files, QueryEmbedder(embedder), settings).retrieve(query)
        hybrid_pg = HybridRetriever(pg, QueryEmbedder(embedder), settings).retrieve(query)
        assert [(p.chunk.source, p.chunk.page, p.chunk.start, p.chunk.end, p.chunk.text) for p in hybrid_pg] == \
            [(p.chunk.source, p.chunk.page, p.chunk.start, p.chunk.end, p.chunk.text) for p in hybrid_files]
    only = ["recipes/bread.txt"]
    vector = embedder.embed_query("warranty degrees")
    assert [c for c, _ in pg.search_dense(vector, 5, sources=only)] == \
        [c for c, _ in files.search_dense(vector, 5, sources=only)]
    assert [c.text for c, _ in pg.search_keyword("warranty degrees", 10, sources=only)] == \
        [CORPUS["recipes/bread.txt"][1][1]]
    assert pg.search_keyword("xylophone", 5) == [] and pg.search_dense(vector, 5, sources=[]) == []


def test_reads_by_id_source_and_neighbours(build_pg_index):
    index = build_pg_index()
    record = index.document_by_source("handbook/calibration.md")
    chunks = index.chunks_of(record.document_id)
    assert [c.text for c in chunks] == CORPUS["handbook/calibration.md"][1] and [c.page for c in chunks] == [1, 1, 2]
    assert index.chunk(chunks[1].id) == chunks[1] and index.chunk("nope") is None
    assert index.document(record.document_id) == record and index.document("nope") is None
    assert index.neighbours(chunks[1].id) == chunks and index.neighbours(chunks[0].id, before=0, after=0) == chunks[:1]
    assert index.neighbours("nope") == [] and index.chunks_of("nope") == []


def test_replace_remove_discard_and_another_process_sees_commits(build_pg_index, embedder, corpus_vectors,
                                                                  postgres_dsn):
    reader = build_pg_index(["recipes/bread.txt"])
    writer = PgTenantIndex.open(shared_database(postgres_dsn), "acme", embedder_name=embedder.name,
                                dimension=embedder.dimension)
    record, chunks = make_document("acme", "travel/norway.txt", *CORPUS["travel/norway.txt"])
    with writer.update() as update:
        update.put_document(record, chunks, corpus_vectors["travel/norway.txt"])
        assert len(reader) == 2  # staged rows stay invisible until the commit
        update.commit()
    assert len(reader) == 4 and reader.refresh() is True and reader.refresh() is False
    assert reader.search_keyword("Hardanger", 1)[0][0] == chunks[1]

    replaced = [text + " Updated." for text in CORPUS["travel/norway.txt"][1]]
    with writer.update() as update:  # the same source again: replaced, not doubled
        update.put_document(*make_document("acme", "travel/norway.txt", "Norway", replaced),
                            embedder.embed_documents(replaced))
        update.commit()
    assert len(reader) == 4 and [c.text for c, _ in reader.search_keyword("Hardanger", 5)] == [replaced[1]]
    with writer.update() as update:
        assert update.remove_source("recipes/bread.txt") is True and update.remove_source("nope") is False
    assert len(reader) == 4  # left without commit: discarded
    with writer.update() as update:
        update.remove_source("recipes/bread.txt")
        update.commit()
    assert [d.source for d in reader.documents()] == ["travel/norway.txt"] and len(reader) == 2
    assert reader.search_keyword("sourdough", 5) == []
    assert {c.source for c, _ in reader.search_dense(corpus_vectors["recipes/bread.txt"][0], 10)} == {"travel/norway.txt"}
    update = writer.update()
    update.commit()  # nothing staged: nothing committed, and the update is closed
    with pytest.raises(LoragError, match="already committed or discarded"):
        update.remove_source("travel/norway.txt")


def test_refusals_name_the_problem(build_pg_index, embedder, corpus_vectors, postgres_dsn):
    build_pg_index(["recipes/bread.txt"])
    database = shared_database(postgres_dsn)
    with pytest.raises(Conflict, match="other-model"):
        PgTenantIndex.open(database, "acme", embedder_name="other-model", dimension=embedder.dimension)
    with pytest.raises(Conflict, match="dimension 768"):
        PgTenantIndex.open(database, "acme", embedder_name=embedder.name, dimension=768)
    with pytest.raises(NotFound, match="lorag ingest"):
        PgTenantIndex.open(database, "ghost", embedder_name="e", dimension=4, create=False)
    assert PgTenantIndex.exists(database, "acme") and not PgTenantIndex.exists(database, "ghost")
    index = PgTenantIndex.open(database, "acme", embedder_name=embedder.name, dimension=embedder.dimension)
    record, chunks = make_document("acme", "travel/norway.txt", *CORPUS["travel/norway.txt"])
    with index.update() as update:
        with pytest.raises(LoragError, match=r"need vectors of shape \(2, 384\)"):
            update.put_document(record, chunks, np.zeros((3, embedder.dimension), dtype=np.float32))
        with pytest.raises(LoragError, match="not 'acme'"):
            update.put_document(*make_document("globex", "travel/norway.txt", *CORPUS["travel/norway.txt"]),
                                corpus_vectors["travel/norway.txt"])
    with pytest.raises(LoragError, match="query vector has dimension 3"):
        index.search_dense(np.ones(3), 2)


def test_drop_removes_every_row_of_the_tenant_only(build_pg_index, postgres_dsn, corpus_vectors):
    acme, globex = build_pg_index(tenant="acme"), build_pg_index(["recipes/bread.txt"], tenant="globex")
    acme.drop()
    database = shared_database(postgres_dsn)
    assert not PgTenantIndex.exists(database, "acme") and len(globex) == 2
    with database.connection() as connection:
        for table in ("lorag.documents", "lorag.chunks", "lorag.chunk_terms", "lorag.window_vectors"):
            assert connection.execute(f"SELECT count(*) FROM {table} WHERE index_id = %s",
                                      (acme.index_id,)).fetchone()[0] == 0, table
    assert globex.search_dense(corpus_vectors["recipes/bread.txt"][0], 1)[0][0].source == "recipes/bread.txt"


def test_no_pickle_anywhere_in_the_store(postgres_dsn):
    """Rows are text, numbers, jsonb and pgvector vectors: no column can hold a pickled object."""
    from pathlib import Path

    import retrieval.pg

    with shared_database(postgres_dsn).connection() as connection:
        types = {row[0] for row in connection.execute(
            "SELECT DISTINCT coalesce(udt_name, data_type) FROM information_schema.columns "
            "WHERE table_schema = 'lorag'").fetchall()}
    assert types <= {"int4", "int8", "text", "jsonb", "vector"}, types
    modules = [*Path(retrieval.pg.__file__).parent.glob("*.py")]
    modules += [Path(retrieval.pg.__file__).parents[1] / name for name in ("copy_tenant.py", "tenant_indexes.py")]
    modules += [Path(retrieval.pg.__file__).parents[2] / "server" / "pg_tenants.py"]
    assert all("pickle" not in path.read_text() for path in modules)


def test_a_removed_tenants_index_is_renamed_away_or_deleted(build_pg_index, postgres_dsn, tmp_path):
    from core.settings import Settings
    from retrieval.pg.index import read_manifest
    from retrieval.tenant_indexes import index_exists, retire_index

    settings = Settings(data_dir=tmp_path, retrieval={"store": postgres_dsn})
    database = shared_database(postgres_dsn)
    kept = build_pg_index(tenant="gamma")
    assert retire_index(settings, "gamma", purge=False, stamp="20261204T000000Z") == "gamma#20261204T000000Z"
    assert not index_exists(settings, "gamma")  # a tenant created again as gamma finds nothing
    assert read_manifest(database, "gamma#20261204T000000Z")[0] == kept.index_id  # kept for an operator
    with pytest.raises(NotFound):
        kept.refresh()  # an instance another process still holds stops serving it

    build_pg_index(tenant="delta")
    assert retire_index(settings, "delta", purge=True, stamp="x") == "purged"
    assert not index_exists(settings, "delta") and read_manifest(database, "delta#x") is None
    assert retire_index(settings, "nobody", purge=True, stamp="x") is None


def test_purge_deletes_an_index_left_in_postgresql_by_an_unregistered_tenant(build_pg_index, postgres_dsn, tmp_path):
    """A PostgreSQL index whose tenant is in no registry (and has no data folder) is found and deleted by purge;
    without purge, removing an unknown tenant is still NotFound."""
    from core.settings import Settings
    from retrieval.tenant_indexes import index_exists
    from server.tenant_lifecycle import remove_tenant
    from server.tenants import TenantRegistry

    settings = Settings(data_dir=tmp_path, retrieval={"store": postgres_dsn})
    build_pg_index(tenant="orphan")
    registry = TenantRegistry(tmp_path)
    with pytest.raises(NotFound):
        remove_tenant(registry, settings, "orphan")
    removed = remove_tenant(registry, settings, "orphan", purge=True)
    assert removed.tenant is None and removed.data == "purged"
    assert not index_exists(settings, "orphan")
