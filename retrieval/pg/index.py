"""One tenant's index in PostgreSQL, with the reading and updating interface of ``retrieval.index.TenantIndex``.

Rows: ``lorag.indexes`` (the manifest and the committed generation), ``lorag.documents``, ``lorag.chunks``,
``lorag.chunk_terms`` (BM25 postings) and ``lorag.window_vectors_<index id>`` (the tenant's partition of the
window vectors, with its own HNSW graph over the same normalised vectors the FAISS files hold).

Every statement names the tenant's index id, so no query can reach another tenant's rows. An update is one
transaction that first locks the tenant's ``lorag.indexes`` row (one writer per tenant, readers never wait):
whatever happens to the writing process, PostgreSQL shows either the old or the new state. Nothing is cached
in memory beyond the manifest, so other processes' commits are visible at once.
"""

import logging
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np

from core.errors import LoragError, NotFound
from core.records import Chunk, DocumentRecord
from retrieval.manifest import FORMAT_VERSION, IndexManifest
from retrieval.pg.database import Database
from retrieval.keyword import TermWeights, idf
from retrieval.pg.keyword import BM25_SQL, STEMMER_LANGUAGE, query_terms

log = logging.getLogger(__name__)

INDEX_TYPE = "hnsw"  # the only vector index this store builds; retrieval.index_type applies to the files
# pgvector's defaults for the graph; ef_search is raised with the number of windows a search wants
# (benchmarks/RESULTS.md, "PostgreSQL store", has the recall against exact search).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
EF_SEARCH_MIN, EF_SEARCH_MAX = 200, 1000  # pgvector refuses ef_search above 1000
WINDOWS_FETCHED_PER_CHUNK = 4  # as retrieval.index: windows of one chunk often rank together

_CHUNK_COLUMNS = 'rowid, chunk_id, source, document_id, page, start, "end", text, heading_path, windows, context'


def _columns_of(alias: str) -> str:
    """_CHUNK_COLUMNS of the table named ``alias`` in a join."""
    return ", ".join(f"{alias}.{column.strip()}" for column in _CHUNK_COLUMNS.split(","))

DOCUMENT_COLUMNS = "document_id, source, pages, chunk_count, size_bytes, ingested_at, name"
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
        self._names: dict[str, str] = {}
        self._names_generation: int | None = None  # the generation self._names was read at

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
        # By id AND tenant: an index renamed away from its tenant (removed, quarantined) is gone for this one too.
        rows = self._rows("SELECT generation FROM lorag.indexes WHERE id = %s AND tenant = %s",
                          (self.index_id, self.tenant))
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
        rows = self._rows(f"SELECT {DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s ORDER BY source",
                          (self.index_id,))
        return [self._document(row) for row in rows]

    def document(self, document_id: str) -> DocumentRecord | None:
        rows = self._rows(
            f"SELECT {DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s AND document_id = %s "
            "ORDER BY source LIMIT 1", (self.index_id, document_id))
        return self._document(rows[0]) if rows else None

    def document_by_source(self, source: str) -> DocumentRecord | None:
        rows = self._rows(f"SELECT {DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s AND source = %s",
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
        # The hits and their chunks in one round trip (BM25_SQL ranks, the join reads the rows it ranked).
        rows = self._rows(
            f"WITH hits AS ({BM25_SQL}) SELECT hits.score, {_columns_of('c')} FROM hits "
            "JOIN lorag.chunks c ON c.index_id = %(index)s AND c.rowid = hits.chunk_rowid "
            "ORDER BY hits.score DESC, hits.chunk_rowid",
            {"index": self.index_id, "terms": terms, "k": k, "sources": None if sources is None else list(sources)})
        return [(self._chunk(row[1:]), float(row[0])) for row in rows if row[0] > 0]

    def term_weights(self, text: str) -> TermWeights:
        """``text``'s keyword terms weighted by their rarity among this index's chunks (BM25's idf, as the file
        store's keyword index computes it)."""
        terms = sorted(set(query_terms(text)))
        if not terms:
            return TermWeights({}, STEMMER_LANGUAGE)
        rows = self._rows(
            "SELECT q.term, count(t.chunk_rowid), (SELECT chunk_count FROM lorag.indexes WHERE id = %(index)s) "
            "FROM unnest(%(terms)s::text[]) AS q(term) "
            "LEFT JOIN lorag.chunk_terms t ON t.index_id = %(index)s AND t.term = q.term GROUP BY q.term",
            {"index": self.index_id, "terms": terms})
        frequency = {term: int(count) for term, count, _ in rows}
        chunk_count = int(rows[0][2] or 0) if rows else 0
        return TermWeights({term: idf(frequency.get(term, 0), chunk_count) for term in terms}, STEMMER_LANGUAGE)

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
        ``(n, dimension)``, as ``PgIndexUpdate.put_document`` takes them; None when there is none."""
        with self.database.connection() as connection:  # one transaction: rows and vectors of one commit
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            documents = connection.execute(
                f"SELECT {DOCUMENT_COLUMNS} FROM lorag.documents WHERE index_id = %s AND source = %s",
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
            windows=tuple(tuple(window) for window in windows), context=context, name=self._name_of(source),
        )

    def _name_of(self, source: str) -> str:
        """The name of the document ``source`` (what clients see), from a map read once per generation this
        instance has seen (``refresh``, called once per request, moves it on): names change only when a
        document is ingested again, and a search building many chunks costs no query per chunk."""
        if self._names_generation != self._generation:
            rows = self._rows("SELECT source, name FROM lorag.documents WHERE index_id = %s", (self.index_id,))
            self._names, self._names_generation = dict(rows), self._generation
        return self._names.get(source, "")

    def _document(self, row: tuple) -> DocumentRecord:
        document_id, source, pages, chunk_count, size_bytes, ingested_at, name = row
        return DocumentRecord(document_id, self.tenant, source, pages, chunk_count, size_bytes, ingested_at, name)

    # ---- writing -------------------------------------------------------------------------------

    def update(self):
        """Start an update (a ``retrieval.pg.update.PgIndexUpdate``): blocks while another process or thread is
        updating this tenant's index."""
        from retrieval.pg.update import PgIndexUpdate

        return PgIndexUpdate(self)

    def moved(self) -> bool:
        """Always False: a PostgreSQL index has no folder to move. An index dropped or renamed away by another
        process is noticed by :meth:`refresh`, which raises NotFound."""
        return False

    def rename(self, name: str) -> str:
        """Give the index to ``name`` (a removed tenant's quarantine name); its rows keep their index id."""
        with self.database.connection() as connection:
            connection.execute("UPDATE lorag.indexes SET tenant = %s WHERE id = %s", (name, self.index_id))
        return name

    def drop(self) -> None:
        """Delete the tenant's whole index (documents, chunks, postings, vectors) in one transaction."""
        with self.database.connection() as connection:
            connection.execute("SELECT 1 FROM lorag.indexes WHERE id = %s FOR UPDATE", (self.index_id,))
            connection.execute("DELETE FROM lorag.chunk_terms WHERE index_id = %s", (self.index_id,))
            connection.execute("DELETE FROM lorag.indexes WHERE id = %s", (self.index_id,))  # cascades to rows
            from psycopg import sql

            connection.execute(sql.SQL("DROP TABLE IF EXISTS {table}").format(table=vectors_table(self.index_id)))


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
