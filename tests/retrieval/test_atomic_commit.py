"""A commit either happens completely or not at all, even when the process dies half way through."""

import fcntl
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.index import LOCK_NAME, TenantIndex
from retrieval.store import ChunkWriter
from tests.retrieval.conftest import make_document

REPO_ROOT = Path(__file__).resolve().parents[2]
DIMENSION = 8


def vectors_for(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def open_index(data_dir) -> TenantIndex:
    return TenantIndex.open(data_dir, "acme", embedder_name="test-embedder", dimension=DIMENSION)


def put(index: TenantIndex, source: str, n: int, seed: int) -> None:
    with index.update() as update:
        record, chunks = make_document("acme", source, "H", [f"{source} paragraph {i}" for i in range(n)])
        update.put_document(record, chunks, vectors_for(n, seed))
        update.commit()


def assert_consistent(index: TenantIndex) -> None:
    """Vectors and rows agree: as many vectors as chunks, and every vector joins to a chunk."""
    chunks = [c for d in index.documents() for c in index.chunks_of(d.document_id)]
    assert len(index) == len(chunks) == sum(d.chunk_count for d in index.documents())
    hits = index.search_dense(vectors_for(1, 99)[0], max(len(index), 1))
    assert sorted(c.id for c, _ in hits) == sorted(c.id for c in chunks)


# Run in a child process: stage a change to the committed index, then die with os._exit (no cleanup,
# no finally blocks, like kill -9) at the named step of the commit.
CRASHING_WRITER = """
import os, sys
import numpy as np
from retrieval import index as index_module, vector_store
from retrieval.store import ChunkWriter
from tests.retrieval.test_atomic_commit import open_index, vectors_for
from tests.retrieval.conftest import make_document

data_dir, step = sys.argv[1], sys.argv[2]
def die(*args, **kwargs):
    os._exit(137)
def torn_save(self, path):
    with open(path, "wb") as handle:
        handle.write(b"IxM2 half a faiss file")
    os._exit(137)
if step == "writing-vectors":
    vector_store.FaissVectorStore.save = torn_save
elif step == "before-sqlite-commit":
    ChunkWriter.commit = die
elif step == "before-old-files-deleted":
    index_module._delete_old_generations = die
index = open_index(data_dir)
update = index.update()
update.remove_source("a.txt")
record, chunks = make_document("acme", "c.txt", "H", ["c one", "c two", "c three"])
update.put_document(record, chunks, vectors_for(3, 7))
update.commit()
os._exit(0)
"""


@pytest.mark.parametrize(
    ("step", "committed"),
    [("writing-vectors", False), ("before-sqlite-commit", False), ("before-old-files-deleted", True)],
)
def test_process_killed_during_commit_leaves_a_consistent_index(data_dir, step, committed):
    index = open_index(data_dir)
    put(index, "a.txt", 4, seed=1)
    put(index, "b.txt", 2, seed=2)
    generation = index.generation

    child = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(data_dir), step], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 137, child.stderr

    after = open_index(data_dir)
    expected = ["b.txt", "c.txt"] if committed else ["a.txt", "b.txt"]
    assert [d.source for d in after.documents()] == expected
    assert after.generation == generation + (1 if committed else 0)
    assert_consistent(after)
    assert index.refresh() is committed
    assert_consistent(index)
    # The dead writer's lock died with it, and the next commit clears its leftovers.
    put(after, "d.txt", 1, seed=4)
    assert_consistent(after)
    assert sorted(p.name for p in after.directory.glob("*vectors-*")) == [f"vectors-{after.generation:08d}.faiss"]


def test_exception_during_commit_keeps_the_previous_state(data_dir, monkeypatch):
    index = open_index(data_dir)
    put(index, "a.txt", 3, seed=1)

    def fail(self, generation):
        raise OSError("disk full")

    monkeypatch.setattr(ChunkWriter, "commit", fail)
    with pytest.raises(OSError, match="disk full"):
        with index.update() as update:
            update.remove_source("a.txt")
            update.put_document(*make_document("acme", "b.txt", "H", ["b"]), vectors_for(1, 2))
            update.commit()
    monkeypatch.undo()

    assert [d.source for d in index.documents()] == ["a.txt"] and index.generation == 1
    assert_consistent(index)
    fresh = open_index(data_dir)
    assert [d.source for d in fresh.documents()] == ["a.txt"] and fresh.generation == 1
    assert_consistent(fresh)
    put(fresh, "b.txt", 2, seed=3)  # the failed update released the lock
    assert [d.source for d in fresh.documents()] == ["a.txt", "b.txt"]
    assert_consistent(fresh)


def test_update_holds_the_tenant_write_lock(data_dir):
    index = open_index(data_dir)
    probe = open(index.directory / LOCK_NAME, "a+b")
    with index.update():
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the update is left
    fcntl.flock(probe, fcntl.LOCK_UN)
    probe.close()


def test_concurrent_writers_do_not_lose_updates(data_dir):
    def writer(number: int) -> None:
        index = open_index(data_dir)  # each writer its own handle, as separate processes would have
        for i in range(4):
            put(index, f"w{number}-{i}.txt", 2, seed=10 * number + i)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    index = open_index(data_dir)
    assert len(index.documents()) == 12 and index.generation == 12
    assert_consistent(index)
