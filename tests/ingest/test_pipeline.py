"""The ingest pipeline end to end with the real embedder and a real tenant index."""

import io
import json
import os
import shutil

import pytest

from ingest.pipeline import ingest_paths, list_documents, remove_sources
from ingest.progress import IngestProgress, should_show_progress
from ingest.loaders import load_document
from ingest.settings import IngestSettings
from core.errors import LoragError, NotFound
from tests.conftest import SAMPLE_DATA, SAMPLE_DOCS
from tests.ingest.bad_inputs import write_bad_inputs, write_non_utf8_name
from tests.ingest.conftest import make_settings


def open_index(settings, tenant, embedder):
    from retrieval.index import TenantIndex

    return TenantIndex.open(
        settings.data_dir, tenant, embedder_name=embedder.name, dimension=embedder.dimension, create=False
    )


def assert_consistent(index):
    """Vectors and rows agree, and every document has exactly its recorded number of chunks."""
    records = index.documents()
    chunks = {record.source: index.chunks_of(record.document_id) for record in records}
    assert len(index) == sum(len(c) for c in chunks.values()) == sum(r.chunk_count for r in records)
    # One vector per sentence window of every chunk.
    assert len(index.vectors) == sum(len(c.windows) for cs in chunks.values() for c in cs) == index.store.vector_total()
    for record in records:
        assert len(chunks[record.source]) == record.chunk_count > 0
        assert all(chunk.windows for chunk in chunks[record.source])


@pytest.fixture(scope="module")
def sample(tmp_path_factory, embedder):
    settings = make_settings(tmp_path_factory.mktemp("sample-data"))
    # The generator script beside the corpus is named too: unsupported files are reported, not fatal.
    report = ingest_paths([SAMPLE_DOCS, SAMPLE_DATA / "make_sample_pdf.py"], tenant="acme", settings=settings,
                          embedder=embedder)
    return settings, report


@pytest.mark.slow
def test_sample_corpus_is_ingested_with_exact_citable_spans(sample, embedder):
    settings, report = sample
    assert report.failed == 0 and report.commits == 1
    added = {os.path.relpath(o.source, SAMPLE_DOCS) for o in report.of("added")}
    assert {"handbook/getting-started.md", "support/faq.html", "specs/kestrel-tide-datasheet.pdf"} <= added
    assert any(o.source.endswith("make_sample_pdf.py") for o in report.of("skipped"))
    index = open_index(settings, "acme", embedder)
    try:
        assert_consistent(index)
        pdf = index.document_by_source(str(SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf"))
        assert pdf.pages == 4
        pages = {p.number: p.text for p in load_document(SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf",
                                                          settings=IngestSettings()).pages}
        for chunk in index.chunks_of(pdf.document_id):
            assert pages[chunk.page][chunk.start : chunk.end] == chunk.text
        hits = index.search_dense(embedder.embed_query("accuracy of the dissolved oxygen sensor"), 3)
        assert (hits[0][0].source, hits[0][0].page) == (pdf.source, 2)
    finally:
        index.close()


def test_second_run_embeds_nothing_and_never_loads_the_model(sample):
    from retrieval.embedder import Embedder

    settings, first = sample
    fresh = Embedder(settings.embedding)
    again = ingest_paths([SAMPLE_DOCS], tenant="acme", settings=settings, embedder=fresh)
    assert again.count("unchanged") == first.count("added") and again.count("added") == 0
    assert again.chunks_embedded == 0 and again.commits == 0
    assert "model" not in vars(fresh)  # the cached model property was never computed


def test_docs_lists_documents_with_page_and_chunk_counts(sample, capsys):
    from lorag.cli import main

    settings, report = sample
    assert main(["docs", "--tenant", "acme", "--data-dir", str(settings.data_dir), "--json"]) == 0
    listed = {d["source"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(listed) == {o.source for o in report.of("added")}
    pdf = listed[str(SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf")]
    assert pdf["pages"] == 4 and pdf["chunk_count"] >= 4
    assert [r.source for r in list_documents(tenant="acme", settings=settings)] == sorted(listed)


def test_changed_file_replaces_its_old_chunks(tmp_path, data_dir, embedder):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# Alpha\n\nThe alpha pump runs at 40 litres per minute.\n")
    (corpus / "b.txt").write_text("Bravo valves are inspected yearly.\n")
    settings = make_settings(data_dir)
    stream = io.StringIO()
    progress = IngestProgress(stream=stream)
    first = ingest_paths([corpus], tenant="t1", settings=settings, embedder=embedder, progress=progress)
    assert first.count("added") == 2 and "chunks/s" in stream.getvalue()
    (corpus / "a.md").write_text("# Alpha\n\nThe alpha pump now runs at 55 litres per minute.\n")
    second = ingest_paths([corpus], tenant="t1", settings=settings, embedder=embedder)
    statuses = [(os.path.basename(o.source), o.status) for o in second.outcomes]
    assert statuses == [("a.md", "updated"), ("b.txt", "unchanged")]
    index = open_index(settings, "t1", embedder)
    try:
        assert_consistent(index)
        record = index.document_by_source(str(corpus / "a.md"))
        texts = [c.text for c in index.chunks_of(record.document_id)]
        assert second.chunks_embedded == record.chunk_count == len(texts)
        assert any("55 litres" in t for t in texts) and not any("40 litres" in t for t in texts)
        assert len(index.documents()) == 2
    finally:
        index.close()


def test_prune_and_remove(tmp_path, data_dir, embedder):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for name in ("keep.txt", "gone.txt", "sub/one.md", "sub/two.md"):
        (corpus / name).write_text(f"Document {name} about pumps and valves.\n")
    settings = make_settings(data_dir)
    assert ingest_paths([corpus], tenant="t2", settings=settings, embedder=embedder).count("added") == 4
    (corpus / "gone.txt").unlink()
    without_prune = ingest_paths([corpus], tenant="t2", settings=settings, embedder=embedder)
    assert without_prune.count("removed") == 0 and len(list_documents(tenant="t2", settings=settings)) == 4
    pruned = ingest_paths([corpus], tenant="t2", settings=settings, embedder=embedder, prune=True)
    assert [o.source for o in pruned.of("removed")] == [str(corpus / "gone.txt")]
    with pytest.raises(NotFound, match="nothere.txt"):
        remove_sources([str(corpus / "keep.txt"), str(corpus / "nothere.txt")], tenant="t2", settings=settings)
    assert len(list_documents(tenant="t2", settings=settings)) == 3  # nothing removed by the refused call
    for empty in ([""], ["  "], []):  # an empty source would match everything under "/"
        with pytest.raises(LoragError, match="empty source"):
            remove_sources(empty, tenant="t2", settings=settings)
    assert len(list_documents(tenant="t2", settings=settings)) == 3
    assert remove_sources([str(corpus / "sub")], tenant="t2", settings=settings) == 2
    assert [r.source for r in list_documents(tenant="t2", settings=settings)] == [str(corpus / "keep.txt")]
    index = open_index(settings, "t2", embedder)
    try:
        assert_consistent(index)
    finally:
        index.close()
    with pytest.raises(NotFound, match="no index"):
        list_documents(tenant="nobody", settings=settings)


@pytest.mark.slow
def test_bad_inputs_never_stop_the_batch(tmp_path, data_dir, embedder):
    corpus = tmp_path / "mixed"
    expected = write_bad_inputs(corpus)
    (corpus / "good.md").write_text("# Good\n\nThis file is fine and mentions turbines.\n")
    (corpus / "résumé — 日本語 📄.md").write_text("Odd names are fine: hydrophones.\n", encoding="utf-8")
    (corpus / "latin1.txt").write_bytes("Caf\xe9 sensors".encode("latin-1"))
    (corpus / "one-line.txt").write_text("longline " * 4_000)  # one 36 KB line
    (corpus / "huge.txt").write_text("big " * 600_000)  # 2.4 MB, over the limit set below
    bad_name = write_non_utf8_name(corpus)
    settings = make_settings(data_dir, max_file_bytes=2_000_000)
    report = ingest_paths([corpus], tenant="t3", settings=settings, embedder=embedder)
    failed = {os.path.basename(o.source): o.reason for o in report.of("failed")}
    for name, words in expected.items():
        assert words.lower() in failed.pop(name).lower()
    assert "MiB limit" in failed.pop("huge.txt")
    shown_name = os.fsencode(bad_name.name).decode("utf-8", "backslashreplace")
    assert failed.pop(shown_name).startswith("file name is not valid UTF-8")
    assert failed == {}
    added = {os.path.basename(o.source): o for o in report.of("added")}
    assert set(added) == {"good.md", "résumé — 日本語 📄.md", "latin1.txt", "one-line.txt"}
    assert "not valid UTF-8" in added["latin1.txt"].warnings[0]
    assert added["one-line.txt"].chunks > 5
    index = open_index(settings, "t3", embedder)
    try:
        assert_consistent(index)
    finally:
        index.close()


def test_cli_exit_status_and_summary(tmp_path, data_dir, capsys):
    from lorag.cli import main

    corpus = tmp_path / "cli"
    corpus.mkdir()
    shutil.copy(SAMPLE_DOCS / "policies" / "returns-and-warranty.txt", corpus)
    (corpus / "broken.pdf").write_text("<html>not a pdf</html>")
    code = main(["ingest", str(corpus), "--tenant", "cli", "--data-dir", str(data_dir), "--chunk-tokens", "64"])
    out = capsys.readouterr().out
    assert code == 1
    assert "added            1" in out and "failed           1" in out
    assert f"failed: {corpus / 'broken.pdf'}: not a PDF (looks like HTML)" in out
    (corpus / "broken.pdf").unlink()
    assert main(["ingest", str(corpus), "--tenant", "cli", "--data-dir", str(data_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["unchanged"] == 1


def test_progress_bar_only_on_a_terminal_outside_ci():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert should_show_progress(Terminal(), {}) is True
    assert should_show_progress(Terminal(), {"CI": "true"}) is False
    assert should_show_progress(io.StringIO(), {}) is False


def test_identical_bytes_under_two_names_stay_two_citable_documents(tmp_path, data_dir, embedder):
    corpus = tmp_path / "copies"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text("The relief valve opens at 6 bar.\n")
    settings = make_settings(data_dir)
    assert ingest_paths([corpus], tenant="t3", settings=settings, embedder=embedder).count("added") == 2
    documents = list_documents(tenant="t3", settings=settings)
    assert len({d.document_id for d in documents}) == 2  # each citation must open its own file
    index = open_index(settings, "t3", embedder)
    try:
        chunks = [c for d in documents for c in index.chunks_of(d.document_id)]
        assert len({c.id for c in chunks}) == len(chunks) == 2
        assert {index.chunk(c.id).source for c in chunks} == {str(corpus / "a.txt"), str(corpus / "b.txt")}
    finally:
        index.close()


def test_a_folder_that_cannot_be_listed_fails_the_run(tmp_path, data_dir, monkeypatch):
    import ingest.discovery

    folder = tmp_path / "locked"
    folder.mkdir()

    def walk_denied(root, *, followlinks, onerror):  # what os.walk does for an unreadable folder
        onerror(PermissionError(13, "Permission denied", str(root)))
        return iter(())

    monkeypatch.setattr(ingest.discovery.os, "walk", walk_denied)
    report = ingest_paths([folder], tenant="t4", settings=make_settings(data_dir))
    assert report.failed == 1
    assert report.of("failed")[0].reason == "cannot read folder: Permission denied"


def test_a_run_with_nothing_to_add_creates_no_index(tmp_path, data_dir):
    from core.datadir import index_dir

    report = ingest_paths([tmp_path / "typo"], tenant="newco", settings=make_settings(data_dir))
    assert report.failed == 1 and report.of("failed")[0].reason == "no such file or folder"
    assert not index_dir(data_dir, "newco").exists()  # `lorag search --tenant newco` still says: no index


def test_window_tokens_sets_the_vectors_per_chunk(tmp_path, data_dir, embedder):
    from ingest.settings import IngestAppSettings
    from core.settings import ChunkingSettings

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sentences = [f"Pump {n} delivers {n * 7} litres per minute at {n + 2} bar of pressure." for n in range(12)]
    (corpus / "pumps.txt").write_text(" ".join(sentences) + "\n")
    for tenant, window_tokens in (("windowed", 20), ("whole", 0)):
        # Without the context line, a window's vector is exactly its sentence's (test_window_context covers it).
        chunking = ChunkingSettings(window_tokens=window_tokens, window_context=False)
        settings = IngestAppSettings(data_dir=data_dir, chunking=chunking)
        assert ingest_paths([corpus], tenant=tenant, settings=settings, embedder=embedder).failed == 0
        index = open_index(settings, tenant, embedder)
        try:
            chunks = [c for r in index.documents() for c in index.chunks_of(r.document_id)]
            if window_tokens:  # one sentence (16-17 tokens) per window
                assert [len(c.windows) for c in chunks] == [len(c.text.split(". ")) for c in chunks]
                assert len(index.vectors) == len(sentences) == index.store.vector_total()
                hits = index.search_dense(embedder.embed_query(sentences[5]), 1)
                assert hits[0][1] == pytest.approx(1.0, abs=1e-2)  # the sentence's own window
            else:
                assert all(c.windows == () for c in chunks) and len(index.vectors) == len(chunks)
        finally:
            index.close()


def test_objects_frozen_for_the_run_go_back_to_the_collector(tmp_path, data_dir, embedder, monkeypatch):
    """Ingest freezes long-lived objects so full collections skip them while pypdf parses; afterwards,
    whether the run ended well or in an error, the collector owns every object again (nothing leaks)."""
    import gc

    import ingest.pipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Pumps are inspected yearly.\n")
    settings = make_settings(data_dir)
    frozen_during_store = []
    real_store = ingest.pipeline._store

    def store_noting_frozen(*args, **kwargs):
        frozen_during_store.append(gc.get_freeze_count())
        return real_store(*args, **kwargs)

    monkeypatch.setattr(ingest.pipeline, "_store", store_noting_frozen)
    report = ingest_paths([corpus], tenant="t1", settings=settings, embedder=embedder)
    assert report.count("added") == 1
    assert frozen_during_store and frozen_during_store[0] > 0
    assert gc.get_freeze_count() == 0

    def failing_store(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ingest.pipeline, "_store", failing_store)
    (corpus / "a.txt").write_text("Pumps are inspected monthly.\n")
    with pytest.raises(RuntimeError, match="disk full"):
        ingest_paths([corpus], tenant="t1", settings=settings, embedder=embedder)
    assert gc.get_freeze_count() == 0


def test_summary_chunks_per_second_is_the_progress_bars(tmp_path, data_dir, embedder):
    import re

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(4):
        (corpus / f"doc{number}.md").write_text(f"# Doc {number}\n\nPump {number} runs at {number * 10} litres per minute.\n")
    stream = io.StringIO()
    report = ingest_paths([corpus], tenant="rate", settings=make_settings(data_dir), embedder=embedder,
                          progress=IngestProgress(stream=stream))
    bar_rates = re.findall(r"rate=([\d.]+) chunks/s", stream.getvalue())
    summary_rate = re.search(r"\(([\d.]+) chunks/s over ([\d.]+) s", report.format_table())
    assert bar_rates and summary_rate, (stream.getvalue(), report.format_table())
    # The bar's last value and the summary are one measurement: chunks over the time spent on the files.
    assert bar_rates[-1] == summary_rate.group(1)
    assert 0 < report.processing_seconds <= report.seconds
    assert report.to_dict()["processing_seconds"] == round(report.processing_seconds, 3)
