"""`lorag db migrate` and `lorag db copy-tenant` against a real PostgreSQL: schema versions, and tenants moved
between the files and PostgreSQL with their documents, vectors and keys intact, both ways."""

import numpy as np
import psycopg
import pytest

from core.errors import LoragError
from core.settings import Settings
from ingest.pipeline import ingest_paths
from lorag.cli import main
from retrieval.pg.database import Database, shared_database
from retrieval.pg.schema import SCHEMA_VERSION
from retrieval.service import RetrievalService
from retrieval.tenant_indexes import open_index
from server.pg_tenants import PgTenantRegistry
from server.tenants import TenantRegistry
from tests.conftest import SAMPLE_DOCS
from tests.postgres import database_dsn

QUERIES = ["how do I clean the probe?", "battery replacement", "getting started with the Kestrel"]


def test_migrate_creates_the_schema_and_versions_are_checked(postgres_server, capsys):
    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute("CREATE DATABASE lorag_migrate")
    dsn = database_dsn(postgres_server, "lorag_migrate")
    assert main(["db", "migrate", "--dsn", dsn]) == 0
    assert f"migrated from version 0 to {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["db", "migrate", "--dsn", dsn]) == 0
    assert "nothing to do" in capsys.readouterr().out
    with Database(dsn).connection() as connection:
        assert connection.execute("SELECT count(*) FROM lorag.indexes").fetchone()[0] == 0

    for stored, expected in ((SCHEMA_VERSION - 1, f"needs {SCHEMA_VERSION}.*lorag db migrate"), (SCHEMA_VERSION + 1, "newer than")):
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("UPDATE lorag.schema_version SET version = %s", (stored,))
        with pytest.raises(LoragError, match=expected):
            with Database(dsn).connection():
                pass
    assert main(["db", "migrate", "--dsn", dsn]) != 0  # a newer schema is never touched
    assert "newer than this lorag" in capsys.readouterr().err
    assert main(["db", "migrate", "--dsn", "files"]) != 0
    assert "no PostgreSQL database named" in capsys.readouterr().err


def test_copy_tenant_to_postgresql_and_back_keeps_everything(tmp_path, embedder, postgres_dsn, capsys):
    files = Settings(data_dir=tmp_path / "files")
    ingest_paths([SAMPLE_DOCS / "handbook"], tenant="acme", settings=files, embedder=embedder)
    _, key = TenantRegistry(files.data_dir).add("acme")

    assert main(["db", "copy-tenant", "acme", "--to", "postgresql", "--dsn", postgres_dsn,
                 "--data-dir", str(files.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "copied 2 documents" in out and "1 key(s) keep working" in out
    postgres = Settings(data_dir=tmp_path / "unused", retrieval={"store": postgres_dsn})
    assert_same_tenant(files, postgres, embedder)
    assert PgTenantRegistry(shared_database(postgres_dsn)).authenticate(key).id == "acme"

    assert main(["db", "copy-tenant", "acme", "--to", "postgresql", "--dsn", postgres_dsn,
                 "--data-dir", str(files.data_dir)]) != 0  # never merged into existing documents
    assert "already has 2 documents" in capsys.readouterr().err

    back = Settings(data_dir=tmp_path / "back")
    assert main(["db", "copy-tenant", "acme", "--to", "files", "--dsn", postgres_dsn,
                 "--data-dir", str(back.data_dir)]) == 0
    assert "copied 2 documents" in capsys.readouterr().out
    assert_same_tenant(files, back, embedder)
    assert TenantRegistry(back.data_dir).authenticate(key).id == "acme"
    assert main(["db", "copy-tenant", "ghost", "--to", "files", "--dsn", postgres_dsn,
                 "--data-dir", str(back.data_dir)]) != 0
    assert "'ghost' has no index" in capsys.readouterr().err


def assert_same_tenant(original: Settings, copy: Settings, embedder) -> None:
    """Documents, chunks (text, spans, windows, context) and vectors equal; retrieval answers the same."""
    opened = [open_index(settings, "acme", embedder_name=embedder.name, dimension=embedder.dimension, create=False)
              for settings in (original, copy)]
    first, second = opened
    assert first.documents() == second.documents() and len(first.documents()) == 2
    for record in first.documents():
        one, two = first.export_document(record.source), second.export_document(record.source)
        assert one[1] == two[1] and any(chunk.windows for chunk in one[1])
        np.testing.assert_allclose(one[2], two[2], atol=1e-6)  # copied, not re-embedded
    services = [RetrievalService(settings, embedder=embedder) for settings in (original, copy)]
    for query in QUERIES:
        answers = [[(p.chunk.id, p.chunk.source, p.chunk.page, p.chunk.start, p.chunk.end)
                    for p in service.retrieve("acme", query, k=4)] for service in services]
        assert answers[0] == answers[1], query


def test_a_copy_waits_for_a_writer_of_the_source_and_copies_one_version_of_it(tmp_path, embedder, postgres_dsn):
    """The copy holds the source's writer lock: started while an update of the source is open, it copies the
    index as that update commits it, never half of the old version and half of the new."""
    import threading
    import time

    from retrieval.copy_tenant import copy_tenant_index

    files = Settings(data_dir=tmp_path / "files")
    ingest_paths([SAMPLE_DOCS / "handbook"], tenant="acme", settings=files, embedder=embedder)
    writer = open_index(files, "acme", embedder_name=embedder.name, dimension=embedder.dimension, create=False)
    removed = writer.documents()[0].source
    reports = []
    with writer.update() as update:
        update.remove_source(removed)
        copying = threading.Thread(target=lambda: reports.append(
            copy_tenant_index(files, "acme", to="postgresql", dsn=postgres_dsn)))
        copying.start()
        time.sleep(0.5)
        assert copying.is_alive() and not reports  # waiting for the lock, nothing copied yet
        update.commit()
    copying.join(timeout=120)
    writer.close()
    [report] = reports
    assert report.documents == 1
    copied = open_index(Settings(data_dir=tmp_path / "unused", retrieval={"store": postgres_dsn}), "acme",
                        embedder_name=embedder.name, dimension=embedder.dimension, create=False)
    assert [d.source for d in copied.documents()] != [] and removed not in [d.source for d in copied.documents()]


def test_copying_a_registered_tenant_without_documents_copies_its_keys_and_succeeds(tmp_path, postgres_dsn, capsys):
    files = Settings(data_dir=tmp_path / "files")
    _, key = TenantRegistry(files.data_dir).add("empty")
    assert main(["db", "copy-tenant", "empty", "--to", "postgresql", "--dsn", postgres_dsn,
                 "--data-dir", str(files.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "registry entry copied" in out and "no index in the source, so no documents to copy" in out
    assert PgTenantRegistry(shared_database(postgres_dsn)).authenticate(key).id == "empty"
