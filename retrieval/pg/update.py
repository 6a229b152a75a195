"""Changes to one tenant's PostgreSQL index inside one transaction (``retrieval.pg.index.PgTenantIndex.update``)."""

import json
import logging
from collections.abc import Sequence

import numpy as np

from core.errors import LoragError, NotFound
from core.records import Chunk, DocumentRecord
from retrieval.pg.index import DOCUMENT_COLUMNS, PgTenantIndex, vectors_table
from retrieval.pg.keyword import keyword_text, term_counts
from retrieval.store import check_document, vector_count

log = logging.getLogger(__name__)


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
        vectors = check_document(record, chunks, vectors, tenant=index.tenant, dimension=index.manifest.dimension)
        self.remove_source(record.source)
        connection, index_id = self._connection, index.index_id
        connection.execute(
            f"INSERT INTO lorag.documents (index_id, {DOCUMENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (index_id, record.document_id, record.source, record.pages, len(chunks), record.size_bytes,
             record.ingested_at, record.name))
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
