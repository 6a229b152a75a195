"""One connection pool per PostgreSQL DSN per process, opened only after the schema version was checked.

Nothing about a tenant is cached here: every read goes to the database, so replicas sharing one DSN see each
other's commits at once.
"""

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from core.errors import LoragError

log = logging.getLogger(__name__)

POOL_SIZE = 8  # connections per process: requests run in a thread pool of about this size


def is_postgres(store: str) -> bool:
    """Whether ``retrieval.store`` names a PostgreSQL database rather than the embedded files."""
    return store.startswith(("postgresql://", "postgres://"))


def redact(dsn: str) -> str:
    """``dsn`` with any password replaced, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"(password=)[^&\s]*", r"\1***", dsn))


def connect(dsn: str, **options):
    """A plain connection (migrations, copy tool). Raises: LoragError naming the redacted DSN when unreachable."""
    import psycopg

    try:
        return psycopg.connect(dsn, **options)
    except psycopg.OperationalError as error:
        raise LoragError(
            f"cannot connect to PostgreSQL at {redact(dsn)!r}: {str(error).strip()}",
            hint="Check retrieval.store (LORAG_RETRIEVAL__STORE) and that the server is running",
        ) from error


class Database:
    """A pool of connections to one DSN with the pgvector types registered; thread-safe."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._pool = None
        self._lock = threading.Lock()

    def _open(self):
        from psycopg_pool import ConnectionPool

        from retrieval.pg.schema import check_schema

        with connect(self.dsn, autocommit=True) as connection:
            check_schema(connection, dsn=self.dsn)  # before any query assumes a table
        pool = ConnectionPool(self.dsn, min_size=1, max_size=POOL_SIZE, configure=_configure, open=False,
                              name="lorag")
        pool.open(wait=True, timeout=30)
        return pool

    @contextmanager
    def connection(self) -> Iterator:
        """A pooled connection for one transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            if self._pool is None:
                self._pool = self._open()
            pool = self._pool
        with pool.connection() as connection:
            yield connection

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def _configure(connection) -> None:
    from pgvector.psycopg import register_vector

    register_vector(connection)
    connection.commit()  # the pool wants its connections idle, not inside the lookup's transaction


_shared: dict[str, Database] = {}
_shared_lock = threading.Lock()


def shared_database(dsn: str) -> Database:
    """The process's :class:`Database` for ``dsn`` (ingest runs and the retrieval service share its pool)."""
    with _shared_lock:
        database = _shared.get(dsn)
        if database is None:
            database = _shared[dsn] = Database(dsn)
        return database


def close_shared_databases() -> None:
    """Close every pool :func:`shared_database` opened (before the server they point at goes away)."""
    with _shared_lock:
        databases = list(_shared.values())
        _shared.clear()
    for database in databases:
        database.close()
