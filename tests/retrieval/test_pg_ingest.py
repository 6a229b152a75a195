"""`retrieval.store = postgresql://...` end to end: the ingest pipeline and the retrieval service on PostgreSQL."""

import shutil

import pytest

from core.errors import LoragError, NotFound
from core.settings import Settings, load_settings
from ingest.pipeline import ingest_paths, list_documents, remove_sources
from retrieval.service import RetrievalService
from tests.conftest import SAMPLE_DOCS


def test_store_setting_comes_from_the_environment_and_is_checked(monkeypatch, data_dir):
    monkeypatch.setenv("LORAG_RETRIEVAL__STORE", "postgresql://lorag:secret@db.internal/lorag")
    assert load_settings(data_dir=data_dir).retrieval.store == "postgresql://lorag:secret@db.internal/lorag"
    monkeypatch.setenv("LORAG_RETRIEVAL__STORE", "mysql://user:secret@host/db")
    with pytest.raises(LoragError, match="retrieval.store must be") as error:
        load_settings(data_dir=data_dir)
    assert "secret" not in str(error.value)  # a DSN's password is never echoed
    monkeypatch.delenv("LORAG_RETRIEVAL__STORE")
    assert Settings(data_dir=data_dir).retrieval.store == "files"


def test_ingest_is_idempotent_prunes_removes_and_serves_citable_passages(tmp_path, data_dir, embedder, postgres_dsn):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_DOCS, corpus)
    settings = Settings(data_dir=data_dir, retrieval={"store": postgres_dsn})
    first = ingest_paths([corpus], tenant="acme", settings=settings, embedder=embedder)
    assert first.count("added") == 5 and first.count("failed") == 0
    assert not (data_dir / "tenants").exists()  # nothing of the index went to files

    again = ingest_paths([corpus], tenant="acme", settings=settings, embedder=embedder)
    assert again.count("unchanged") == 5 and again.commits == 0  # content hashes: nothing re-embedded

    service = RetrievalService(settings, embedder=embedder)
    passages = service.retrieve("acme", "How long is the warranty?", k=3)
    assert passages and {"dense", "keyword"} & set(passages[0].scores)
    for passage in passages:  # the span cites the page's text exactly
        chunk = passage.chunk
        assert chunk.end - chunk.start == len(chunk.text) and chunk.page >= 1 and chunk.source.startswith(str(corpus))
    pdf = [p for p in service.retrieve("acme", "tide gauge datasheet", k=5) if p.chunk.source.endswith(".pdf")]
    assert pdf and all(p.chunk.page >= 1 for p in pdf)

    faq = corpus / "support" / "faq.html"
    faq.write_text(faq.read_text() + "<p>The Kestrel hotline answers on Sundays at 0800 123 456.</p>")
    changed = ingest_paths([corpus], tenant="acme", settings=settings, embedder=embedder)
    assert changed.count("updated") == 1 and changed.count("unchanged") == 4
    assert "Sundays" in service.retrieve("acme", "hotline on Sundays", k=1, mode="keyword")[0].chunk.text

    (corpus / "handbook" / "maintenance.md").unlink()
    pruned = ingest_paths([corpus], tenant="acme", settings=settings, embedder=embedder, prune=True)
    assert [o.source for o in pruned.of("removed")] == [str(corpus / "handbook" / "maintenance.md")]
    assert remove_sources([str(corpus / "support")], tenant="acme", settings=settings) == 1
    assert len(list_documents(tenant="acme", settings=settings)) == 3
    assert all(not p.chunk.source.endswith("faq.html") for p in service.retrieve("acme", "hotline Sundays", k=5))
    assert service.documents("globex") == [] and service.retrieve("globex", "warranty") == []
    with pytest.raises(NotFound, match="no index in the PostgreSQL store"):
        list_documents(tenant="globex", settings=settings)


def test_a_database_without_the_schema_is_refused_with_what_to_run(postgres_server, data_dir, embedder):
    import psycopg

    from tests.postgres import database_dsn

    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute("CREATE DATABASE lorag_empty")
    settings = Settings(data_dir=data_dir, retrieval={"store": database_dsn(postgres_server, "lorag_empty")})
    with pytest.raises(LoragError, match="has no lorag schema") as error:
        RetrievalService(settings, embedder=embedder).documents("acme")
    assert "lorag db migrate" in str(error.value)


def test_an_index_dropped_and_recreated_by_another_process_is_reopened(data_dir, embedder, postgres_dsn):
    from retrieval.pg.database import Database
    from retrieval.pg.index import PgTenantIndex
    from tests.retrieval.conftest import CORPUS, make_document

    settings = Settings(data_dir=data_dir, retrieval={"store": postgres_dsn})
    service = RetrievalService(settings, embedder=embedder)
    other = Database(postgres_dsn)  # another replica's pool

    def write(source):
        index = PgTenantIndex.open(other, "acme", embedder_name=embedder.name, dimension=embedder.dimension)
        with index.update() as update:
            update.put_document(*make_document("acme", source, *CORPUS[source]),
                                embedder.embed_documents(CORPUS[source][1]))
            update.commit()
        return index

    write("recipes/bread.txt")
    assert [d.source for d in service.documents("acme")] == ["recipes/bread.txt"]
    write("recipes/bread.txt").drop()
    assert service.documents("acme") == [] and service.index("acme") is None
    write("travel/norway.txt")
    assert [d.source for d in service.documents("acme")] == ["travel/norway.txt"]
    other.close()
