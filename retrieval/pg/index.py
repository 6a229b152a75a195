"""One tenant's index in PostgreSQL, with the reading and updating interface of ``retrieval.index.TenantIndex``.

Rows: ``lorag.indexes`` (the manifest and the committed generation), ``lorag.documents``, ``lorag.chunks``,
``lorag.chunk_terms`` (BM25 postings) and ``lorag.window_vectors_<index id>`` (the tenant's partition of the
window vectors, with its own HNSW graph over the same normalised vectors the FAISS files hold).

Every statement names the tenant's index id, so no query can reach another tenant's rows. An update is one
transaction that first locks the tenant's ``lorag.indexes`` row (one writer per tenant, readers never wait):
whatever happens to the writing process, PostgreSQL shows either the old or the new state. Nothing is cached
in memory beyond the manifest, so other processes' commits are visible at once.
"""

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np

from core.errors import LoragError, NotFound
from core.records import Chunk, DocumentRecord
from retrieval.manifest import FORMAT_VERSION, IndexManifest
from retrieval.pg.database import Database
from retrieval.pg.keyword import BM25_SQL, keyword_text, query_terms, term_counts
from retrieval.store import WINDOW_SLOTS, vector_count

log = logging.getLogger(__name__)

INDEX_TYPE = "hnsw"  # the only vector index this store builds; retrieval.index_type applies to the files
# pgvector's defaults for the graph; ef_search is raised with the number of windows a search wants
# (benchmarks/RESULTS.md, "PostgreSQL store", has the recall against exact search).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
EF_SEARCH_MIN, EF_SEARCH_MAX = 200, 1000  # pgvector refuses ef_search above 1000
WINDOWS_FETCHED_PER_CHUNK = 4  # as retrieval.index: windows of one chunk often rank together

_CHUNK_COLUMNS = 'rowid, chunk_id, source, document_id, page, start, "end", text, heading_path, windows, context'
_DOCUMENT_COLUMNS = "document_id, source, pages, chunk_count, size_bytes, ingested_at"
_MANIFEST_COLUMNS = "id, embedder_name, dimension, index_type, created_at, format_version"


def vectors_table(index_id: int):
    """The tenant's partition of ``lorag.window_vectors`` (an identifier built from the integer id only)."""
    from psycopg import sql

    return sql.Identifier("lorag", f"window_vectors_{int(index_id)}")


class PgTenantIndex:
    """Read access to one tenant's index in PostgreSQL (thread-safe) and the entry point for atomic updates."""

    def __init__(self, database: Database, *, index_id: int, tenant: str, manifest: IndexManifest):
        self.database = database
        self.index_id = index_id
        self.tenant = tenant
        self.manifest = manifest
        self._generation = self._read_generation()

    @classmethod
    def open(
        cls,
        database: Database,
        tenant: str,
        *,
        embedder_name: str,
        dimension: int,
        index_type: str = INDEX_TYPE,
        create: bool = True,
    ) -> "PgTenantIndex":
        """Open the tenant's index, creating an empty one when ``create`` is true.

        Raises:
            Conflict: the index was built with another embedder name or dimension.
            NotFound: there is no index and ``create`` is false.
        """
        found = read_manifest(database, tenant)
        if found is None:
            if not create:
                raise NotFound(
                    f"tenant {tenant!r} has no index in the PostgreSQL store",
                    hint=f"Ingest documents first: lorag ingest PATH --tenant {tenant}",
                )
            found = _create(database, tenant, embedder_name=embedder_name, dimension=dimension)
        index_id, manifest = found
        manifest.check_embedder(embedder_name=embedder_name, dimension=dimension,
                                where=f"PostgreSQL index of tenant {tenant!r}")
        if index_type != INDEX_TYPE:
            log.debug("tenant %s: the PostgreSQL store searches with HNSW (retrieval.index_type %r applies to files)",
                      tenant, index_type)
        return cls(database, index_id=index_id, tenant=tenant, manifest=manifest)

    @staticmethod
    def exists(database: Database, tenant: str) -> bool:
        return read_manifest(database, tenant) is not None

    # ---- reading -------------------------------------------------------------------------------

    def _rows(self, query, parameters: Sequence | dict = ()) -> list[tuple]:
        with self.database.connection() as connection:
            return connection.execute(query, parameters).fetchall()

    def _read_generation(self) -> int:
        rows = self._rows("SELECT generation FROM lorag.indexes WHERE id = %s", (self.index_id,))
        if not rows:
            raise NotFound(f"tenant {self.tenant!r} has no index in the PostgreSQL store (it was removed)")
        return int(rows[0][0])

    @property
    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        """The number of committed chunks."""
        rows = self._rows("SELECT chunk_count FROM lorag.indexes WHERE id = %s", (self.index_id,))
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        """Nothing to release: connections belong to the process's pool."""

    def refresh(self) -> bool:
        """Whether another process committed since the last look (reads always see the latest commit)."""
        generation = self._read_generation()
        changed, self._generation = generation != self._generation, generation
        return changed

    def documents(self) -> list[DocumentRecord]:
        rows = self._rows(f"SELECT {_DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s ORDER BY source",
                          (self.index_id,))
        return [self._document(row) for row in rows]

    def document(self, document_id: str) -> DocumentRecord | None:
        rows = self._rows(
            f"SELECT {_DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s AND document_id = %s "
            "ORDER BY source LIMIT 1", (self.index_id, document_id))
        return self._document(rows[0]) if rows else None

    def document_by_source(self, source: str) -> DocumentRecord | None:
        rows = self._rows(f"SELECT {_DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s AND source = %s",
                          (self.index_id, source))
        return self._document(rows[0]) if rows else None

    def chunk(self, chunk_id: str) -> Chunk | None:
        rows = self._rows(f"SELECT {_CHUNK_COLUMNS} FROM lorag.chunks WHERE index_id = %s AND chunk_id = %s "
                          "ORDER BY rowid LIMIT 1", (self.index_id, chunk_id))
        return self._chunk(rows[0]) if rows else None

    def chunks_of(self, document_id: str) -> list[Chunk]:
        """The document's chunks in reading order (empty when the document is unknown)."""
        document = self.document(document_id)
        if document is None:
            return []
        rows = self._rows(f"SELECT {_CHUNK_COLUMNS} FROM lorag.chunks WHERE index_id = %s AND source = %s "
                          "ORDER BY ordinal", (self.index_id, document.source))
        return [self._chunk(row) for row in rows]

    def neighbours(self, chunk_id: str, *, before: int = 1, after: int = 1) -> list[Chunk]:
        """The chunk itself with up to ``before``/``after`` chunks of the same document around it, in reading order."""
        rows = self._rows(
            f"""WITH hit AS (SELECT source, ordinal FROM lorag.chunks WHERE index_id = %(index)s
                             AND chunk_id = %(chunk)s ORDER BY rowid LIMIT 1)
            SELECT {', '.join('c.' + column.strip() for column in _CHUNK_COLUMNS.split(','))}
            FROM lorag.chunks c JOIN hit ON c.source = hit.source
            WHERE c.index_id = %(index)s AND c.ordinal BETWEEN hit.ordinal - %(before)s AND hit.ordinal + %(after)s
            ORDER BY c.ordinal""",
            {"index": self.index_id, "chunk": chunk_id, "before": max(before, 0), "after": max(after, 0)},
        )
        return [self._chunk(row) for row in rows]

    def search_dense(self, vector: np.ndarray, k: int, *, sources: Sequence[str] | None = None) -> list[tuple[Chunk, float]]:
        """The ``k`` chunks with the highest cosine similarity between ``vector`` ``(dimension,)`` and one of
        their windows (a chunk scores by its best window), best first. Without ``sources`` the HNSW graph is
        searched; with them, the named documents' windows are compared exactly.

        Raises:
            LoragError: ``vector`` does not have the index's dimension.
        """
        from psycopg import sql

        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        dimension = self.manifest.dimension
        if vector.shape[0] != dimension:
            raise LoragError(f"query vector has dimension {vector.shape[0]}, index has {dimension}")
        if k <= 0:
            return []
        if sources is not None:
            sources = list(dict.fromkeys(sources))
            if not sources:
                return []
            # Not the graph's expression (no cast), so the planner compares every selected window exactly.
            query = sql.SQL(
                "SELECT w.chunk_rowid, 1 - (w.embedding <=> %(q)s) FROM {table} w "
                "JOIN lorag.chunks c ON c.rowid = w.chunk_rowid "
                "WHERE w.index_id = %(index)s AND c.index_id = %(index)s AND c.source = ANY(%(sources)s) "
                "ORDER BY w.embedding <=> %(q)s LIMIT %(n)s"
            ).format(table=vectors_table(self.index_id))
        else:
            cast = sql.SQL("vector({})").format(sql.Literal(dimension))
            query = sql.SQL(
                "SELECT chunk_rowid, 1 - ((embedding::{cast}) <=> %(q)s::{cast}) FROM {table} "
                "WHERE index_id = %(index)s ORDER BY (embedding::{cast}) <=> %(q)s::{cast} LIMIT %(n)s"
            ).format(table=vectors_table(self.index_id), cast=cast)
        wanted = k * WINDOWS_FETCHED_PER_CHUNK
        while True:
            with self.database.connection() as connection:
                ef_search = min(max(wanted, EF_SEARCH_MIN), EF_SEARCH_MAX)
                connection.execute(f"SET LOCAL hnsw.ef_search = {ef_search}")
                # Past ef_search the graph walk goes on (relaxed order: sorted below) instead of stopping short.
                connection.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                rows = connection.execute(
                    query, {"q": vector, "index": self.index_id, "sources": sources, "n": wanted}).fetchall()
            rows.sort(key=lambda row: -row[1])
            best: dict[int, float] = {}  # chunk rowid -> its best window's score, best first
            for rowid, score in rows:
                best.setdefault(int(rowid), float(score))
            if len(best) >= k or len(rows) < wanted:
                break
            wanted *= 4
        return self._join(list(best.items())[:k])

    def search_keyword(self, query: str, k: int, *, sources: Sequence[str] | None = None) -> list[tuple[Chunk, float]]:
        """The ``k`` best BM25 matches for ``query`` (chunks sharing no term with it are left out)."""
        terms = query_terms(query)
        if not terms or k <= 0 or (sources is not None and not sources):
            return []
        rows = self._rows(BM25_SQL, {"index": self.index_id, "terms": terms, "k": k,
                                     "sources": None if sources is None else list(sources)})
        return self._join([(int(rowid), float(score)) for rowid, score in rows if score > 0])

    def _join(self, hits: list[tuple[int, float]]) -> list[tuple[Chunk, float]]:
        if not hits:
            return []
        rows = self._rows(f"SELECT {_CHUNK_COLUMNS} FROM lorag.chunks WHERE index_id = %s AND rowid = ANY(%s)",
                          (self.index_id, [rowid for rowid, _ in hits]))
        chunks = {int(row[0]): self._chunk(row) for row in rows}
        # A row deleted by a commit made since the search is simply skipped.
        return [(chunks[rowid], score) for rowid, score in hits if rowid in chunks]

    def export_document(self, source: str) -> tuple[DocumentRecord, list[Chunk], np.ndarray] | None:
        """The document stored under ``source`` with its chunks (reading order) and their window vectors
        ``(n, dimension)``, as :meth:`PgIndexUpdate.put_document` takes them; None when there is none."""
        with self.database.connection() as connection:  # one transaction: rows and vectors of one commit
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            documents = connection.execute(
                f"SELECT {_DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s AND source = %s",
                (self.index_id, source)).fetchall()
            if not documents:
                return None
            chunk_rows = connection.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM lorag.chunks WHERE index_id = %s AND source = %s ORDER BY ordinal",
                (self.index_id, source)).fetchall()
            from psycopg import sql

            vector_rows = connection.execute(
                sql.SQL("SELECT chunk_rowid, ordinal, embedding FROM {table} WHERE index_id = %s "
                        "AND chunk_rowid = ANY(%s)").format(table=vectors_table(self.index_id)),
                (self.index_id, [row[0] for row in chunk_rows])).fetchall()
        position = {int(row[0]): number for number, row in enumerate(chunk_rows)}
        vector_rows.sort(key=lambda row: (position[int(row[0])], row[1]))
        vectors = np.asarray([row[2].to_numpy() for row in vector_rows], dtype=np.float32)
        vectors = vectors.reshape(-1, self.manifest.dimension)
        return self._document(documents[0]), [self._chunk(row) for row in chunk_rows], vectors

    def _chunk(self, row: tuple) -> Chunk:
        _, chunk_id, source, document_id, page, start, end, text, heading_path, windows, context = row
        return Chunk(
            id=chunk_id, tenant=self.tenant, document_id=document_id, source=source, page=page, start=start,
            end=end, text=text, heading_path=tuple(heading_path),
            windows=tuple(tuple(window) for window in windows), context=context,
        )

    def _document(self, row: tuple) -> DocumentRecord:
        document_id, source, pages, chunk_count, size_bytes, ingested_at = row
        return DocumentRecord(document_id, self.tenant, source, pages, chunk_count, size_bytes, ingested_at)

    # ---- writing -------------------------------------------------------------------------------

    def update(self) -> "PgIndexUpdate":
        """Start an update: blocks while another process or thread is updating this tenant's index."""
        return PgIndexUpdate(self)

    def drop(self) -> None:
        """Delete the tenant's whole index (documents, chunks, postings, vectors) in one transaction."""
        with self.database.connection() as connection:
            connection.execute("SELECT 1 FROM lorag.indexes WHERE id = %s FOR UPDATE", (self.index_id,))
            connection.execute("DELETE FROM lorag.chunk_terms WHERE index_id = %s", (self.index_id,))
            connection.execute("DELETE FROM lorag.indexes WHERE id = %s", (self.index_id,))  # cascades to rows
            from psycopg import sql

            connection.execute(sql.SQL("DROP TABLE IF EXISTS {table}").format(table=vectors_table(self.index_id)))


class PgIndexUpdate:
    """Changes to one tenant's index inside one PostgreSQL transaction; invisible to readers until
    :meth:`commit`. Use as a context manager; leaving the block without ``commit()`` discards them."""

    def __init__(self, index: PgTenantIndex):
        from contextlib import ExitStack

        self.index = index
        self._stack = ExitStack()
        self._connection = self._stack.enter_context(index.database.connection())
        try:
            # The tenant's row lock: one writer at a time; readers keep reading the last commit meanwhile.
            locked = self._connection.execute(
                "SELECT generation FROM lorag.indexes WHERE id = %s FOR UPDATE", (index.index_id,)).fetchone()
            if locked is None:
                raise NotFound(f"tenant {index.tenant!r} has no index in the PostgreSQL store (it was removed)")
        except BaseException:
            self._connection.rollback()
            self._stack.close()
            raise
        self._changed = False
        self._open = True

    def __enter__(self) -> "PgIndexUpdate":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def put_document(self, record: DocumentRecord, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Store ``record`` with its ``chunks`` (reading order) and their ``vectors`` ``(n, dimension)`` (one
        per ``embedded_texts()`` entry, chunk after chunk), replacing the document stored under the same source.

        Raises:
            LoragError: the shapes disagree, or a chunk belongs to another source or tenant.
        """
        self._check_open()
        index = self.index
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dimension = index.manifest.dimension
        expected = sum(vector_count(chunk) for chunk in chunks)
        if vectors.shape != (expected, dimension):
            raise LoragError(
                f"document {record.source!r}: {len(chunks)} chunks with {expected} embedded texts need vectors of "
                f"shape ({expected}, {dimension}), got {vectors.shape}"
            )
        if record.tenant != index.tenant:
            raise LoragError(f"document {record.source!r} is for tenant {record.tenant!r}, not {index.tenant!r}")
        for chunk in chunks:
            if chunk.source != record.source or chunk.tenant != index.tenant:
                raise LoragError(
                    f"chunk {chunk.id!r} belongs to source {chunk.source!r} of tenant {chunk.tenant!r}, "
                    f"not to document {record.source!r} of tenant {index.tenant!r}"
                )
            if len(chunk.windows) > WINDOW_SLOTS:  # the file store's limit, kept so both stores take the same data
                raise LoragError(f"chunk {chunk.id!r} of {record.source!r} has {len(chunk.windows)} windows, at most "
                                 f"{WINDOW_SLOTS} fit", hint="Raise chunking.window_tokens")
        self.remove_source(record.source)
        connection, index_id = self._connection, index.index_id
        connection.execute(
            f"INSERT INTO lorag.documents (index_id, {_DOCUMENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (index_id, record.document_id, record.source, record.pages, len(chunks), record.size_bytes,
             record.ingested_at))
        self._changed = True
        if not chunks:
            return
        rowids = [row[0] for row in connection.execute(
            "SELECT nextval('lorag.chunks_rowid_seq') FROM generate_series(1, %s)", (len(chunks),)).fetchall()]
        terms = term_counts([keyword_text(chunk.text, chunk.context) for chunk in chunks])
        with connection.cursor().copy(
            'COPY lorag.chunks (rowid, index_id, chunk_id, source, document_id, ordinal, page, start, "end", text, '
            "heading_path, windows, context, term_count) FROM STDIN"
        ) as copy:
            for ordinal, (rowid, chunk, counts) in enumerate(zip(rowids, chunks, terms)):
                copy.write_row((rowid, index_id, chunk.id, chunk.source, chunk.document_id, ordinal, chunk.page,
                                chunk.start, chunk.end, chunk.text, json.dumps(list(chunk.heading_path)),
                                json.dumps([list(window) for window in chunk.windows]), chunk.context,
                                sum(counts.values())))
        with connection.cursor().copy(
            "COPY lorag.chunk_terms (index_id, term, chunk_rowid, tf, doc_length) FROM STDIN"
        ) as copy:
            for rowid, counts in zip(rowids, terms):
                length = sum(counts.values())
                for term, tf in counts.items():
                    copy.write_row((index_id, term, rowid, tf, length))
        from psycopg import sql

        with connection.cursor().copy(
            sql.SQL("COPY {table} (index_id, chunk_rowid, ordinal, embedding) FROM STDIN WITH (FORMAT BINARY)")
            .format(table=vectors_table(index_id))
        ) as copy:
            copy.set_types(["int8", "int8", "int4", "vector"])
            offset = 0
            for rowid, chunk in zip(rowids, chunks):
                for ordinal in range(vector_count(chunk)):
                    copy.write_row((index_id, rowid, ordinal, vectors[offset]))
                    offset += 1

    def remove_source(self, source: str) -> bool:
        """Remove the document stored under ``source``; returns whether there was one."""
        from psycopg import sql

        self._check_open()
        connection, index_id = self._connection, self.index.index_id
        rowids = [row[0] for row in connection.execute(
            "SELECT rowid FROM lorag.chunks WHERE index_id = %s AND source = %s", (index_id, source)).fetchall()]
        if rowids:
            connection.execute(
                sql.SQL("DELETE FROM {table} WHERE index_id = %s AND chunk_rowid = ANY(%s)")
                .format(table=vectors_table(index_id)), (index_id, rowids))
            connection.execute("DELETE FROM lorag.chunk_terms WHERE index_id = %s AND chunk_rowid = ANY(%s)",
                               (index_id, rowids))
            connection.execute("DELETE FROM lorag.chunks WHERE index_id = %s AND source = %s", (index_id, source))
        removed = connection.execute("DELETE FROM lorag.documents WHERE index_id = %s AND source = %s RETURNING 1",
                                     (index_id, source)).fetchall()
        self._changed = self._changed or bool(removed)
        return bool(removed)

    def commit(self) -> None:
        """Make every change visible at once: the new counts and generation commit with the rows.

        Raises:
            LoragError: the update was already committed or discarded.
        """
        self._check_open()
        if not self._changed:
            self.discard()
            return
        index, connection = self.index, self._connection
        try:
            generation, chunk_count = connection.execute(
                "UPDATE lorag.indexes SET generation = generation + 1, "
                "chunk_count = (SELECT count(*) FROM lorag.chunks WHERE index_id = %(index)s), "
                "term_total = (SELECT coalesce(sum(term_count), 0) FROM lorag.chunks WHERE index_id = %(index)s) "
                "WHERE id = %(index)s RETURNING generation, chunk_count", {"index": index.index_id}).fetchone()
            connection.commit()  # the commit point
        except BaseException:
            self.discard()
            raise
        self._open = False
        self._stack.close()
        index._generation = int(generation)
        log.info("tenant %s: committed generation %d (%d chunks) to PostgreSQL", index.tenant, generation, chunk_count)

    def discard(self) -> None:
        """Roll the transaction back and release the tenant's lock (what leaving the block does)."""
        if not self._open:
            return
        self._open = False
        try:
            self._connection.rollback()
        finally:
            self._stack.close()

    def _check_open(self) -> None:
        if not self._open:
            raise LoragError(f"index update of tenant {self.index.tenant!r} was already committed or discarded")


def read_manifest(database: Database, tenant: str) -> tuple[int, IndexManifest] | None:
    """``(index id, manifest)`` of the tenant's index, or None when it has none."""
    with database.connection() as connection:
        row = connection.execute(f"SELECT {_MANIFEST_COLUMNS} FROM lorag.indexes WHERE tenant = %s",
                                 (tenant,)).fetchone()
    if row is None:
        return None
    index_id, embedder_name, dimension, index_type, created_at, format_version = row
    if format_version != FORMAT_VERSION:
        raise LoragError(f"PostgreSQL index of tenant {tenant!r} has format_version {format_version}, this lorag "
                         f"reads {FORMAT_VERSION}", hint="Re-ingest the tenant's documents with this version of lorag")
    return int(index_id), IndexManifest(embedder_name=embedder_name, dimension=int(dimension),
                                        index_type=index_type, created_at=created_at)


def _create(database: Database, tenant: str, *, embedder_name: str, dimension: int) -> tuple[int, IndexManifest]:
    """Insert the tenant's manifest row and create its vector partition with the HNSW graph, in one transaction
    (two processes creating the same tenant: the unique name makes one wait, then find the other's)."""
    from psycopg import sql

    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with database.connection() as connection:
        row = connection.execute(
            "INSERT INTO lorag.indexes (tenant, embedder_name, dimension, index_type, format_version, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant) DO NOTHING RETURNING id",
            (tenant, embedder_name, dimension, INDEX_TYPE, FORMAT_VERSION, created_at)).fetchone()
        if row is not None:
            index_id = int(row[0])
            table = vectors_table(index_id)
            connection.execute(sql.SQL(
                "CREATE TABLE {table} PARTITION OF lorag.window_vectors "
                "(CHECK (vector_dims(embedding) = {dimension})) FOR VALUES IN ({id})"
            ).format(table=table, id=sql.Literal(index_id), dimension=sql.Literal(dimension)))
            connection.execute(sql.SQL("CREATE INDEX ON {table} (chunk_rowid)").format(table=table))
            connection.execute(sql.SQL(
                "CREATE INDEX ON {table} USING hnsw ((embedding::vector({dimension})) vector_cosine_ops) "
                "WITH (m = {m}, ef_construction = {ef})"
            ).format(table=table, dimension=sql.Literal(dimension), m=sql.Literal(HNSW_M),
                     ef=sql.Literal(HNSW_EF_CONSTRUCTION)))
    found = read_manifest(database, tenant)
    if found is None:  # the tenant was dropped between the two statements
        raise LoragError(f"the PostgreSQL index of tenant {tenant!r} was removed while it was being created")
    return found
