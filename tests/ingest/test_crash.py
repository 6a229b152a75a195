"""kill -9 during a real ``lorag ingest`` process never leaves a broken or half-updated index."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.loaders import document_id_of
from retrieval.index import vectors_path
from tests.conftest import REPO_ROOT

FILES = 24
TENANT = "crash"


def write_version(corpus: Path, version: int) -> dict[str, str]:
    """Write every file of the corpus as of ``version``; returns the expected {source: document_id}."""
    corpus.mkdir(exist_ok=True)
    for number in range(FILES):
        body = "\n\n".join(
            f"Unit {number} revision {version}: pump {number} delivers {number * 7 + version} litres per minute "
            f"and valve {number} opens at {number + version} bar. " * 2
            for _ in range(3)
        )
        (corpus / f"doc-{number:02d}.md").write_text(f"# Unit {number}\n\n{body}\n")
    return {str(path): document_id_of(path) for path in sorted(corpus.iterdir())}


def read_state(data_dir: Path, embedder) -> dict[str, str]:
    """Open the index as a fresh reader, check it is internally consistent, return {source: document_id}."""
    from retrieval.index import TenantIndex

    index = TenantIndex.open(data_dir, TENANT, embedder_name=embedder.name, dimension=embedder.dimension)
    try:
        records = index.documents()
        chunk_rows = 0
        for record in records:
            chunks = index.chunks_of(record.document_id)
            assert len(chunks) == record.chunk_count > 0, record.source
            assert {chunk.source for chunk in chunks} == {record.source}
            chunk_rows += len(chunks)
        assert len(index) == chunk_rows
        # One vector per window of every chunk row, none left over from a removed or replaced chunk.
        assert len(index.vectors) == index.store.vector_total() > chunk_rows
        if records:  # the vectors are searchable and point at live rows
            hits = index.search_dense(embedder.embed_query("pump litres per minute"), 3)
            assert len(hits) == 3
        return {record.source: record.document_id for record in records}
    finally:
        index.close()


def start_ingest(corpus: Path, data_dir: Path) -> subprocess.Popen:
    # One torch thread: on a shared 2-core machine, spinning intra-op threads slow a tiny model down.
    env = dict(os.environ, CI="true", LORAG_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lorag.cli", "ingest", str(corpus), "--tenant", TENANT],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_when(process: subprocess.Popen, condition, *, timeout: float = 120) -> bool:
    """SIGKILL ``process`` as soon as ``condition()`` holds; returns whether it was killed before exiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.kill()
    raise AssertionError("ingest did not finish in time")


@pytest.mark.slow
def test_kill_9_at_any_moment_keeps_the_previous_or_the_new_state(tmp_path, data_dir, embedder):
    from ingest.pipeline import ingest_paths
    from tests.ingest.conftest import make_settings

    corpus = tmp_path / "corpus"
    index_path = data_dir / "tenants" / TENANT / "index"
    settings = make_settings(data_dir)
    expected = {0: write_version(corpus, 0)}
    assert ingest_paths([corpus], tenant=TENANT, settings=settings, embedder=embedder).failed == 0
    assert read_state(data_dir, embedder) == expected[0]
    current, generation, first_run = 0, 0, None

    def new_vectors_file() -> bool:  # between the vector file rename and the SQLite commit: the protocol's core
        return any(int(p.stem.split("-")[1]) > generation for p in index_path.glob("vectors-*.faiss"))

    rng = random.Random(7)
    outcomes = []
    def old_vectors_file_gone() -> bool:  # just after the commit point, while old generations are deleted
        return not vectors_path(index_path, generation).exists()

    for name in ("new vectors file", "old vectors file gone", "random delay"):
        target = 1 - current
        expected[target] = write_version(corpus, target)
        generation = max(int(p.stem.split("-")[1]) for p in index_path.glob("vectors-*.faiss"))
        started = time.monotonic()
        if name == "new vectors file":
            condition = new_vectors_file
        elif name == "old vectors file gone":
            condition = old_vectors_file_gone
        else:
            delay = first_run * rng.uniform(0.5, 1.05)
            condition = lambda: time.monotonic() - started > delay  # noqa: E731
        killed = kill_when(start_ingest(corpus, data_dir), condition)
        first_run = first_run or time.monotonic() - started
        state = read_state(data_dir, embedder)
        assert state in (expected[current], expected[target]), f"kill at {name!r} left a mixed state"
        outcomes.append((name, killed, "new" if state == expected[target] else "previous"))
        current = target if state == expected[target] else current
    print("kill outcomes:", outcomes)
    assert any(killed for _, killed, _ in outcomes), outcomes
    # After the kills, a normal run completes and lands on the corpus as it is on disk now.
    assert ingest_paths([corpus], tenant=TENANT, settings=settings, embedder=embedder).failed == 0
    assert read_state(data_dir, embedder) == expected[target]
