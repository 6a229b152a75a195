"""The PostgreSQL schema as numbered migrations, the version table, and the check every process runs first.

Everything lives in the ``lorag`` schema, so the tables never meet another application's in a shared database.
A migration is applied in one transaction together with its version bump, under an advisory lock, so two
``lorag db migrate`` runs at once apply each step exactly once.
"""

import logging

from core.errors import LoragError
from retrieval.pg.database import connect, redact

log = logging.getLogger(__name__)

# An arbitrary constant naming "the lorag migration lock" among the database's advisory locks.
MIGRATION_LOCK = 0x6C6F726167

MIGRATIONS: tuple[str, ...] = (
    # 1: indexes (one per tenant: the manifest and the committed generation), documents, chunks, the BM25
    # postings, the window vectors (one partition per index, each with its own HNSW graph), tenants and keys.
    """
    CREATE EXTENSION IF NOT EXISTS vector;
    CREATE SCHEMA IF NOT EXISTS lorag;
    CREATE TABLE lorag.indexes (
        id bigserial PRIMARY KEY,
        tenant text NOT NULL UNIQUE,
        embedder_name text NOT NULL,
        dimension integer NOT NULL CHECK (dimension > 0),
        index_type text NOT NULL,
        format_version integer NOT NULL,
        created_at text NOT NULL,
        generation bigint NOT NULL DEFAULT 0,   -- bumped by every commit: readers compare it to refresh
        chunk_count bigint NOT NULL DEFAULT 0,  -- BM25's N
        term_total bigint NOT NULL DEFAULT 0    -- sum of the chunks' term counts: BM25's average length
    );
    CREATE TABLE lorag.documents (
        index_id bigint NOT NULL REFERENCES lorag.indexes ON DELETE CASCADE,
        source text NOT NULL,
        document_id text NOT NULL,
        pages integer NOT NULL,
        chunk_count integer NOT NULL,
        size_bytes bigint NOT NULL,
        ingested_at text NOT NULL,
        PRIMARY KEY (index_id, source)
    );
    CREATE INDEX documents_by_id ON lorag.documents (index_id, document_id);
    CREATE TABLE lorag.chunks (
        rowid bigserial PRIMARY KEY,  -- never reused, like the file store's AUTOINCREMENT rowid
        index_id bigint NOT NULL REFERENCES lorag.indexes ON DELETE CASCADE,
        chunk_id text NOT NULL,
        source text NOT NULL,
        document_id text NOT NULL,
        ordinal integer NOT NULL,
        page integer NOT NULL,
        start integer NOT NULL,
        "end" integer NOT NULL,
        text text NOT NULL,
        heading_path jsonb NOT NULL,
        windows jsonb NOT NULL,       -- [[start, end], ...] page offsets of the embedded windows ([] = whole text)
        context text NOT NULL,
        term_count integer NOT NULL   -- BM25 document length
    );
    CREATE INDEX chunks_by_id ON lorag.chunks (index_id, chunk_id);
    CREATE INDEX chunks_by_source ON lorag.chunks (index_id, source, ordinal);
    -- BM25 over a table: one row per (chunk, distinct term), terms as retrieval.keyword tokenises them.
    CREATE TABLE lorag.chunk_terms (
        index_id bigint NOT NULL,
        term text NOT NULL,
        chunk_rowid bigint NOT NULL,
        tf integer NOT NULL,
        doc_length integer NOT NULL,
        PRIMARY KEY (index_id, term, chunk_rowid)
    );
    CREATE INDEX chunk_terms_by_chunk ON lorag.chunk_terms (chunk_rowid);
    CREATE TABLE lorag.window_vectors (
        index_id bigint NOT NULL,
        chunk_rowid bigint NOT NULL,
        ordinal integer NOT NULL,
        embedding vector NOT NULL
    ) PARTITION BY LIST (index_id);
    CREATE TABLE lorag.tenants (
        id text PRIMARY KEY,
        default_adapter text,
        created_at text NOT NULL
    );
    CREATE TABLE lorag.tenant_keys (
        key_hash text PRIMARY KEY,  -- sha256 of the key; the key itself is never stored
        tenant_id text NOT NULL REFERENCES lorag.tenants ON DELETE CASCADE
    );
    """,
    # 2: documents carry the name clients are shown (DocumentRecord.name: the path relative to what was ingested)
    """
    ALTER TABLE lorag.documents ADD COLUMN name text NOT NULL DEFAULT '';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def read_version(connection) -> int | None:
    """The database's schema version, or None when it has no lorag schema yet."""
    exists = connection.execute("SELECT to_regclass('lorag.schema_version')").fetchone()[0]
    if exists is None:
        return None
    row = connection.execute("SELECT version FROM lorag.schema_version").fetchone()
    return None if row is None else int(row[0])


def check_schema(connection, *, dsn: str) -> None:
    """Refuse a database whose schema is missing, older or newer than this lorag's.

    Raises:
        LoragError: with the versions and what to run.
    """
    version = read_version(connection)
    where = redact(dsn)
    if version is None:
        raise LoragError(f"PostgreSQL database {where!r} has no lorag schema",
                         hint="Create it with: lorag db migrate")
    if version < SCHEMA_VERSION:
        raise LoragError(
            f"PostgreSQL database {where!r} has lorag schema version {version}, this lorag needs {SCHEMA_VERSION}",
            hint="Upgrade the schema with: lorag db migrate",
        )
    if version > SCHEMA_VERSION:
        raise LoragError(
            f"PostgreSQL database {where!r} has lorag schema version {version}, newer than this lorag's "
            f"{SCHEMA_VERSION}",
            hint="Run the lorag release that migrated it (upgrade this installation)",
        )


def migrate(dsn: str) -> tuple[int | None, int]:
    """Create or upgrade the schema; returns ``(version before, version after)``.

    Raises:
        LoragError: the database is unreachable, or its schema is newer than this lorag's.
    """
    with connect(dsn) as connection:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            before = read_version(connection)
        if before is not None and before > SCHEMA_VERSION:
            check_schema(connection, dsn=dsn)
        version = before or 0
        while version < SCHEMA_VERSION:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                current = read_version(connection) or 0
                if current != version:  # another migrate run got here first
                    version = current
                    continue
                connection.execute(MIGRATIONS[version])
                connection.execute("CREATE TABLE IF NOT EXISTS lorag.schema_version (version integer NOT NULL)")
                connection.execute("DELETE FROM lorag.schema_version")
                connection.execute("INSERT INTO lorag.schema_version VALUES (%s)", (version + 1,))
            version += 1
            log.info("schema of %s migrated to version %d", redact(dsn), version)
    return before, version
