"""kill -9 of a writing process at several points of a re-ingest: PostgreSQL shows the old or the new state of
the tenant, never a mix, and the next writer is not blocked by the dead one's lock."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.pg.database import shared_database
from retrieval.pg.index import PgTenantIndex

REPO = Path(__file__).resolve().parents[2]
SOURCES = [f"docs/file-{number}.txt" for number in range(5)]
DIMENSION = 8

# The writer: re-ingests every source as `version`, announcing each step and waiting for a line on stdin before
# going on, so the test kills it exactly at the announced point.
WRITER = r"""
import sys
import numpy as np
from core.records import Chunk, DocumentRecord
from retrieval.pg.database import Database
from retrieval.pg.index import PgTenantIndex

dsn, version, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
index = PgTenantIndex.open(Database(dsn), "acme", embedder_name="test", dimension=8)

def step(name):
    print(name, flush=True)
    sys.stdin.readline()

rng = np.random.default_rng(abs(hash(version)) % 1000)
update = index.update()
step("locked")
for number, source in enumerate(sources):
    texts = [f"{version} paragraph {i} of {source}" for i in range(3 + number)]
    chunks, offset = [], 0
    for i, text in enumerate(texts):
        chunks.append(Chunk(f"{version}-{number}-{i}", "acme", f"{version}-{number}", source, 1, offset,
                            offset + len(text), text))
        offset += len(text) + 1
    record = DocumentRecord(f"{version}-{number}", "acme", source, 1, len(chunks), offset, "2026-01-01T00:00:00+00:00")
    vectors = rng.normal(size=(len(chunks), 8)).astype(np.float32)
    update.put_document(record, chunks, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    step(f"put {number}")
update.remove_source("docs/old-only.txt")
step("staged")
update.commit()
step("committed")
"""


def run_writer(dsn: str, version: str, kill_at: str | None) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", WRITER, dsn, version, *SOURCES], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        for line in child.stdout:
            if line.strip() == kill_at:
                os.kill(child.pid, signal.SIGKILL)
                break
            child.stdin.write("\n")
            child.stdin.flush()
        assert child.wait(timeout=60) == (-signal.SIGKILL if kill_at else 0)
    finally:
        if child.poll() is None:
            child.kill()


def versions_seen(index: PgTenantIndex) -> set[str]:
    """Every version a stored row belongs to, after checking that rows, counts and vectors agree."""
    database = index.database
    with database.connection() as connection:
        chunk_count, rows, vectors, terms_chunks = connection.execute(
            "SELECT (SELECT chunk_count FROM lorag.indexes WHERE id = %(i)s),"
            " (SELECT count(*) FROM lorag.chunks WHERE index_id = %(i)s),"
            " (SELECT count(*) FROM lorag.window_vectors WHERE index_id = %(i)s),"
            " (SELECT count(DISTINCT chunk_rowid) FROM lorag.chunk_terms WHERE index_id = %(i)s)",
            {"i": index.index_id}).fetchone()
    assert chunk_count == rows == vectors == terms_chunks
    documents = index.documents()
    seen = {record.document_id.split("-")[0] for record in documents}
    for record in documents:
        chunks = index.chunks_of(record.document_id)
        assert len(chunks) == record.chunk_count
        seen |= {chunk.text.split()[0] for chunk in chunks}
    for chunk, _ in index.search_keyword("paragraph", 100):
        seen.add(chunk.text.split()[0])
    return seen


@pytest.mark.slow
def test_kill_minus_nine_leaves_old_or_new_state(postgres_dsn):
    database = shared_database(postgres_dsn)
    run_writer(postgres_dsn, "v1", kill_at=None)
    index = PgTenantIndex.open(database, "acme", embedder_name="test", dimension=DIMENSION)
    assert versions_seen(index) == {"v1"} and len(index.documents()) == len(SOURCES)

    current = "v1"
    for number, kill_at in enumerate(["locked", "put 0", "put 3", "staged", "committed"]):
        version = f"v{number + 2}"
        run_writer(postgres_dsn, version, kill_at=kill_at)
        if kill_at == "committed":
            current = version
        assert versions_seen(index) == {current}, f"killed at {kill_at!r}"
        assert [record.source for record in index.documents()] == sorted(SOURCES)
    assert current == "v6"
