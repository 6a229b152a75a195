"""Chunk text and metadata of one tenant in SQLite; each chunk's rowid names its vectors' FAISS ids.

A chunk has one vector per embedded window (``Chunk.windows``, or one for its whole text): vector id =
``rowid * WINDOW_SLOTS + window ordinal``, so a search hit maps back to its chunk by integer division, with
no lookup table to keep consistent. The ``state`` table also records the committed vector generation, so
rows and vectors change in one SQLite transaction (see ``retrieval.index`` for the commit protocol).

Chunks carry the context line their windows were embedded with (``Chunk.context``). Files written before it
have no ``context`` column: readers treat every context as empty, and the next write adds the column.
Documents carry the name clients are shown (``DocumentRecord.name``: the path relative to what was ingested);
files written before it have no ``name`` column and their documents go by their file name.
"""

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from core.datadir import PRIVATE_FILE_MODE
from core.errors import LoragError
from core.records import Chunk, DocumentRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    source TEXT PRIMARY KEY,
    document_id TEXT NOT NULL,
    pages INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    ingested_at TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT ''  -- what clients are shown (DocumentRecord.name); '' = the file name
);
CREATE INDEX IF NOT EXISTS documents_by_id ON documents(document_id);
-- AUTOINCREMENT: a rowid is never reused, so a stale vector id can never point at a newer chunk.
CREATE TABLE IF NOT EXISTS chunks (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_id TEXT NOT NULL,
    source TEXT NOT NULL,
    document_id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    page INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    text TEXT NOT NULL,
    heading_path TEXT NOT NULL,
    windows TEXT NOT NULL,  -- JSON [[start, end], ...]: page offsets of the embedded windows ([] = whole text)
    context TEXT NOT NULL DEFAULT ''  -- the chunk's context line (Chunk.context); '' = none
);
CREATE INDEX IF NOT EXISTS chunks_by_id ON chunks(chunk_id);
CREATE INDEX IF NOT EXISTS chunks_by_source ON chunks(source, ordinal);
"""
_CHUNK_COLUMNS = 'rowid, chunk_id, source, document_id, page, start, "end", text, heading_path, windows'
_CONTEXT_COLUMN = "context TEXT NOT NULL DEFAULT ''"
_DOCUMENT_COLUMNS = "document_id, source, pages, chunk_count, size_bytes, ingested_at"
_NAME_COLUMN = "name TEXT NOT NULL DEFAULT ''"
_EMPTY_TEXT = "''"  # what a file written before a column reads in its place
# A chunk's document name, looked up with the chunk: chunks of one document share it.
_CHUNK_NAME = "COALESCE((SELECT documents.name FROM documents WHERE documents.source = chunks.source), '')"
# Vector ids per chunk: 1024 windows is far more than a chunk of at most max_seq_length tokens can have,
# and rowid * 1024 stays exact in int64 for any rowid SQLite will ever hand out here.
WINDOW_SLOTS = 1024


def vector_ids_of(rowids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The vector ids of chunks ``rowids`` with ``counts`` vectors each, chunk by chunk, windows in order."""
    rowids = np.asarray(rowids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    firsts = np.repeat(rowids * WINDOW_SLOTS, counts)
    ordinals = np.arange(len(firsts), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return firsts + ordinals


def chunk_rowids_of(vector_ids: np.ndarray) -> np.ndarray:
    """The chunk rowid each vector id belongs to."""
    return np.asarray(vector_ids, dtype=np.int64) // WINDOW_SLOTS


def vector_count(chunk: Chunk) -> int:
    """How many vectors stand for ``chunk``: one per window, or one for its whole text."""
    return max(1, len(chunk.windows))


def check_document(record: DocumentRecord, chunks: Sequence[Chunk], vectors, *, tenant: str,
                   dimension: int) -> np.ndarray:
    """What every store checks before it stores a document: the vectors' shape (one per embedded text of each
    chunk, ``dimension`` wide), that the record and every chunk are ``tenant``'s and the record's source, and that
    no chunk has more windows than WINDOW_SLOTS (the file store's limit, kept by both stores so that both take
    the same data). Returns the vectors as contiguous float32.

    Raises:
        LoragError: naming the document or chunk and what is wrong.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    expected = sum(vector_count(chunk) for chunk in chunks)
    if vectors.shape != (expected, dimension):
        raise LoragError(
            f"document {record.source!r}: {len(chunks)} chunks with {expected} embedded texts need vectors of "
            f"shape ({expected}, {dimension}), got {vectors.shape}"
        )
    if record.tenant != tenant:
        raise LoragError(f"document {record.source!r} is for tenant {record.tenant!r}, not {tenant!r}")
    for chunk in chunks:
        if chunk.source != record.source or chunk.tenant != tenant:
            raise LoragError(
                f"chunk {chunk.id!r} belongs to source {chunk.source!r} of tenant {chunk.tenant!r}, "
                f"not to document {record.source!r} of tenant {tenant!r}"
            )
        if len(chunk.windows) > WINDOW_SLOTS:
            raise LoragError(f"chunk {chunk.id!r} of {record.source!r} has {len(chunk.windows)} windows, at most "
                             f"{WINDOW_SLOTS} fit", hint="Raise chunking.window_tokens")
    return vectors


def connect(path: Path) -> sqlite3.Connection:
    # Created owner-only before SQLite opens it: its -wal and -shm files take the database file's mode.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
    except FileExistsError:
        pass
    # WAL: readers see the last committed state and never wait for a writer.
    connection = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def create_schema(path: Path) -> None:
    connection = connect(path)
    try:
        connection.executescript(_SCHEMA)
    finally:
        connection.close()


def has_context_column(connection: sqlite3.Connection) -> bool:
    """Whether the chunks table has the ``context`` column (files written before it have not)."""
    return any(row[1] == "context" for row in connection.execute("PRAGMA table_info(chunks)"))


def has_name_column(connection: sqlite3.Connection) -> bool:
    """Whether the documents table has the ``name`` column (files written before it have not)."""
    return any(row[1] == "name" for row in connection.execute("PRAGMA table_info(documents)"))


class ChunkStore:
    """Read side of one tenant's SQLite file; safe to share between threads."""

    def __init__(self, path: Path, *, tenant: str):
        self.path = Path(path)
        self.tenant = tenant
        self._connection = connect(self.path)
        self._lock = threading.Lock()
        self._has_context = False  # see _context_column
        self._has_name = False  # see _name_column

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _rows(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    def _context_column(self) -> str:
        """The chunks' context column, or '' for a file written before it (looked for until found: a writer in
        another process adds it)."""
        if not self._has_context:
            with self._lock:
                self._has_context = has_context_column(self._connection)
        return "context" if self._has_context else "''"

    def _name_column(self) -> bool:
        """Whether documents have names yet (looked for until found, as the context column is)."""
        if not self._has_name:
            with self._lock:
                self._has_name = has_name_column(self._connection)
        return self._has_name

    def _chunk_columns(self) -> str:
        return f"{_CHUNK_COLUMNS}, {self._context_column()}, {_CHUNK_NAME if self._name_column() else _EMPTY_TEXT}"

    def _document_columns(self) -> str:
        return f"{_DOCUMENT_COLUMNS}, {'name' if self._name_column() else _EMPTY_TEXT}"

    def _rows_where_in(self, select: str, column: str, values: list) -> list[tuple]:
        """Rows of ``select ... WHERE column IN values``, queried in batches that stay under SQLite's
        bound-parameter limit."""
        rows: list[tuple] = []
        for offset in range(0, len(values), 500):
            batch = values[offset : offset + 500]
            rows += self._rows(f"{select} WHERE {column} IN ({','.join('?' * len(batch))})", batch)
        return rows

    def generation(self) -> int:
        return read_generation(self._rows("SELECT value FROM state WHERE key = 'generation'"))

    def generation_and_count(self) -> tuple[int, int]:
        """The committed generation and its number of chunks, from one consistent snapshot (one statement)."""
        ((generation, count),) = self._rows(
            "SELECT (SELECT value FROM state WHERE key = 'generation'), (SELECT count(*) FROM chunks)"
        )
        return (0 if generation is None else int(generation)), int(count)

    def count(self) -> int:
        return int(self._rows("SELECT count(*) FROM chunks")[0][0])

    def documents(self) -> list[DocumentRecord]:
        rows = self._rows(f"SELECT {self._document_columns()} FROM documents ORDER BY source")
        return [self._document(row) for row in rows]

    def document(self, document_id: str) -> DocumentRecord | None:
        rows = self._rows(f"SELECT {self._document_columns()} FROM documents WHERE document_id = ? ORDER BY source LIMIT 1", (document_id,))
        return self._document(rows[0]) if rows else None

    def document_by_source(self, source: str) -> DocumentRecord | None:
        rows = self._rows(f"SELECT {self._document_columns()} FROM documents WHERE source = ?", (source,))
        return self._document(rows[0]) if rows else None

    def chunk(self, chunk_id: str) -> Chunk | None:
        rows = self._rows(f"SELECT {self._chunk_columns()} FROM chunks WHERE chunk_id = ? ORDER BY rowid LIMIT 1", (chunk_id,))
        return self._chunk(rows[0]) if rows else None

    def chunks_of(self, document_id: str) -> list[Chunk]:
        document = self.document(document_id)
        if document is None:
            return []
        rows = self._rows(f"SELECT {self._chunk_columns()} FROM chunks WHERE source = ? ORDER BY ordinal", (document.source,))
        return [self._chunk(row) for row in rows]

    def neighbours(self, chunk_id: str, *, before: int = 1, after: int = 1) -> list[Chunk]:
        rows = self._rows("SELECT source, ordinal FROM chunks WHERE chunk_id = ? ORDER BY rowid LIMIT 1", (chunk_id,))
        if not rows:
            return []
        source, ordinal = rows[0]
        rows = self._rows(
            f"SELECT {self._chunk_columns()} FROM chunks WHERE source = ? AND ordinal BETWEEN ? AND ? ORDER BY ordinal",
            (source, ordinal - max(before, 0), ordinal + max(after, 0)),
        )
        return [self._chunk(row) for row in rows]

    def chunks_by_rowid(self, rowids: Iterable[int]) -> dict[int, Chunk]:
        """The chunks stored under ``rowids`` (ids no longer stored are absent from the result)."""
        rows = self._rows_where_in(f"SELECT {self._chunk_columns()} FROM chunks", "rowid", [int(rowid) for rowid in rowids])
        return {int(row[0]): self._chunk(row) for row in rows}

    def rowids_of_sources(self, sources: Iterable[str]) -> np.ndarray:
        rows = self._rows_where_in("SELECT rowid FROM chunks", "source", list(dict.fromkeys(sources)))
        return np.asarray([row[0] for row in rows], dtype=np.int64)

    def vector_ids_of_sources(self, sources: Iterable[str]) -> np.ndarray:
        """The vector ids of every chunk of ``sources`` (for a filtered vector search)."""
        rows = self._rows_where_in("SELECT rowid, windows FROM chunks", "source", list(dict.fromkeys(sources)))
        counts = [max(1, len(json.loads(windows))) for _, windows in rows]
        return vector_ids_of(np.asarray([row[0] for row in rows], dtype=np.int64), np.asarray(counts))

    def rowids_and_vector_counts_of_source(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """The rowids of the chunks of ``source`` in reading order, with each one's number of vectors."""
        rows = self._rows("SELECT rowid, windows FROM chunks WHERE source = ? ORDER BY ordinal", (source,))
        counts = [max(1, len(json.loads(windows))) for _, windows in rows]
        return np.asarray([row[0] for row in rows], dtype=np.int64), np.asarray(counts, dtype=np.int64)

    def vector_total(self) -> int:
        """How many vectors the stored chunks have (equals the vector file's size when both are committed)."""
        rows = self._rows("SELECT windows FROM chunks")
        return sum(max(1, len(json.loads(windows))) for (windows,) in rows)

    def texts(self) -> tuple[np.ndarray, list[str]]:
        """Every chunk's ``(rowids, texts)`` in rowid order: the keyword index's corpus. A chunk's text follows
        its context line, so a query naming the document's title matches its words too."""
        context = self._context_column()
        rows = self._rows(
            f"SELECT rowid, CASE WHEN {context} = '' THEN text ELSE {context} || char(10) || text END "
            "FROM chunks ORDER BY rowid"
        )
        return np.asarray([row[0] for row in rows], dtype=np.int64), [row[1] for row in rows]

    def _chunk(self, row: tuple) -> Chunk:
        rowid, chunk_id, source, document_id, page, start, end, text, heading_path, windows, context, name = row
        return Chunk(
            id=chunk_id,
            tenant=self.tenant,
            document_id=document_id,
            source=source,
            page=page,
            start=start,
            end=end,
            text=text,
            heading_path=tuple(json.loads(heading_path)),
            windows=tuple(tuple(window) for window in json.loads(windows)),
            context=context,
            name=name,
        )

    def _document(self, row: tuple) -> DocumentRecord:
        document_id, source, pages, chunk_count, size_bytes, ingested_at, name = row
        return DocumentRecord(document_id, self.tenant, source, pages, chunk_count, size_bytes, ingested_at, name)


def read_generation(rows: list[tuple]) -> int:
    return int(rows[0][0]) if rows else 0


class ChunkWriter:
    """One write transaction on the chunk store; nothing is visible to readers until :meth:`commit`."""

    def __init__(self, path: Path):
        self._connection = connect(path)
        self._connection.execute("BEGIN IMMEDIATE")
        if not has_context_column(self._connection):  # a file from before chunk contexts; committed with the rest
            self._connection.execute(f"ALTER TABLE chunks ADD COLUMN {_CONTEXT_COLUMN}")
        if not has_name_column(self._connection):  # a file from before document names
            self._connection.execute(f"ALTER TABLE documents ADD COLUMN {_NAME_COLUMN}")
        self.generation = read_generation(
            self._connection.execute("SELECT value FROM state WHERE key = 'generation'").fetchall()
        )

    def remove_source(self, source: str) -> np.ndarray:
        """Delete the document stored under ``source`` and its chunks; returns their vector ids."""
        rows = self._connection.execute("SELECT rowid, windows FROM chunks WHERE source = ?", (source,)).fetchall()
        self._connection.execute("DELETE FROM chunks WHERE source = ?", (source,))
        self._connection.execute("DELETE FROM documents WHERE source = ?", (source,))
        counts = [max(1, len(json.loads(windows))) for _, windows in rows]
        return vector_ids_of(np.asarray([row[0] for row in rows], dtype=np.int64), np.asarray(counts))

    def has_source(self, source: str) -> bool:
        return self._connection.execute("SELECT 1 FROM documents WHERE source = ?", (source,)).fetchone() is not None

    def insert_document(self, record: DocumentRecord, chunks: Sequence[Chunk]) -> np.ndarray:
        """Insert ``record`` and its ``chunks`` (in reading order, checked by :func:`check_document`); returns
        their vector ids, chunk by chunk."""
        self._connection.execute(
            f"INSERT INTO documents ({_DOCUMENT_COLUMNS}, name) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.document_id, record.source, record.pages, len(chunks), record.size_bytes, record.ingested_at,
             record.name),
        )
        rowids = []
        for ordinal, chunk in enumerate(chunks):
            cursor = self._connection.execute(
                'INSERT INTO chunks (chunk_id, source, document_id, ordinal, page, start, "end", text, heading_path, '
                "windows, context) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (chunk.id, chunk.source, chunk.document_id, ordinal, chunk.page, chunk.start, chunk.end, chunk.text,
                 json.dumps(list(chunk.heading_path)), json.dumps([list(window) for window in chunk.windows]),
                 chunk.context),
            )
            rowids.append(cursor.lastrowid)
        counts = np.asarray([vector_count(chunk) for chunk in chunks], dtype=np.int64)
        return vector_ids_of(np.asarray(rowids, dtype=np.int64), counts)

    def commit(self, generation: int) -> int:
        """Record ``generation`` as the current vector file and make every change visible, atomically.

        Returns the number of chunks now stored.
        """
        count = int(self._connection.execute("SELECT count(*) FROM chunks").fetchone()[0])
        self._connection.execute(
            "INSERT INTO state (key, value) VALUES ('generation', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(generation),),
        )
        self._connection.execute("COMMIT")
        self._connection.close()
        return count

    def rollback(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")
        self._connection.close()
