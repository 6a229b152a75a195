"""Encrypted PDFs (empty user password opens, a real password is refused by name), links that lead nowhere named
at WARNING in the report, pypdf's own warnings attributed to the file, stale vector generations cleaned up."""

import logging
import os
import shutil

import pytest

from ingest.discovery import discover_files
from ingest.loaders import LoadError, load_document
from ingest.pipeline import ingest_paths
from ingest.settings import IngestSettings
from tests.conftest import SAMPLE_DOCS
from tests.ingest.bad_inputs import SAMPLE_PDF, encrypted_pdf
from tests.ingest.conftest import make_settings

LIMITS = IngestSettings()


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_encrypted_pdf_with_an_empty_user_password_opens(tmp_path, algorithm):
    path = tmp_path / "open-to-all.pdf"
    path.write_bytes(encrypted_pdf(user_password="", algorithm=algorithm))
    document = load_document(path, settings=LIMITS)
    assert [page.number for page in document.pages] == [1, 2, 3, 4]
    assert "18.5 kg" in document.pages[0].text


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-256"])
def test_password_protected_pdf_is_refused_by_name(tmp_path, algorithm):
    path = tmp_path / "locked.pdf"
    path.write_bytes(encrypted_pdf(user_password="secret", algorithm=algorithm))
    with pytest.raises(LoadError, match=r"locked\.pdf: encrypted: a password is required"):
        load_document(path, settings=LIMITS)


def test_html_renamed_pdf_is_not_a_pdf_that_looks_like_html(tmp_path):
    path = tmp_path / "page.pdf"
    path.write_text("<!doctype html><html><head><title>x</title></head><body>hi</body></html>")
    with pytest.raises(LoadError, match=r"page\.pdf: not a PDF \(looks like HTML\)"):
        load_document(path, settings=LIMITS)


def test_pypdf_warnings_are_attributed_to_the_file(tmp_path, caplog):
    data = SAMPLE_PDF.read_bytes()
    start = data.rindex(b"startxref")
    damaged = data[:start] + b"startxref\n12\n%%EOF\n"  # a wrong cross-reference offset: pypdf repairs and warns
    path = tmp_path / "damaged.pdf"
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING):
        document = load_document(path, settings=LIMITS)
    assert "18.5 kg" in document.pages[0].text
    pypdf_notes = [w for w in document.warnings if ": pypdf: " in w]
    assert pypdf_notes and all(w.startswith(f"{path}: pypdf: ") for w in pypdf_notes), document.warnings
    assert [r for r in caplog.records if r.name.startswith("pypdf")] == []  # not also logged without the file


def test_symlink_loops_self_links_and_dangling_links_are_named(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "real.txt").write_text("a real file about otters")
    os.symlink("self.txt", root / "self.txt")
    os.symlink("b.md", root / "a.md")
    os.symlink("a.md", root / "b.md")
    os.symlink("gone.txt", root / "dangling.txt")
    found = discover_files([root])
    reasons = {path.name: reason for path, reason in found.broken_links}
    assert reasons == {
        "self.txt": "symbolic link to itself: self.txt -> self.txt",
        "a.md": "symbolic link loop: a.md -> b.md -> a.md",
        "b.md": "symbolic link loop: b.md -> a.md -> b.md",
        "dangling.txt": "dangling symbolic link: dangling.txt -> gone.txt (no such file)",
    }
    assert [p.name for p in found.files] == ["real.txt"]


def test_broken_links_are_warnings_in_the_ingest_report(tmp_path, data_dir, embedder, caplog):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "real.txt").write_text("Otters hold hands while they sleep so they do not drift apart.")
    os.symlink("loop.txt", root / "loop.txt")
    with caplog.at_level(logging.INFO, logger="ingest.pipeline"):
        report = ingest_paths([root], tenant="links", settings=make_settings(data_dir), embedder=embedder)
    outcome = next(o for o in report.outcomes if o.source.endswith("loop.txt"))
    assert outcome.status == "skipped" and outcome.reason == "symbolic link to itself: loop.txt -> loop.txt"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "loop.txt -> loop.txt" in r.getMessage()]
    assert warned


def test_a_kill_between_commit_and_cleanup_leaves_no_stale_generation_after_reopen_or_rerun(
    tmp_path, data_dir, embedder, monkeypatch
):
    import retrieval.index as index_module
    from retrieval.index import TenantIndex

    settings = make_settings(data_dir)
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SAMPLE_DOCS / "policies" / "returns-and-warranty.txt", docs)
    ingest_paths([docs], tenant="gen", settings=settings, embedder=embedder)
    index_dir = data_dir / "tenants" / "gen" / "index"

    def killed_before_cleanup():
        # The commit happens, then the process dies before the old generation's file is deleted.
        with monkeypatch.context() as patch:
            patch.setattr(index_module, "_delete_old_generations", lambda *a, **k: None)
            ingest_paths([docs], tenant="gen", settings=settings, embedder=embedder)

    def vector_files():
        return sorted(p.name for p in index_dir.glob("vectors-*.faiss"))

    (docs / "more.txt").write_text("Kestrel boats are painted orange so that rescuers can see them.")
    killed_before_cleanup()
    assert len(vector_files()) == 2  # the stale generation the issue describes
    report = ingest_paths([docs], tenant="gen", settings=settings, embedder=embedder)  # changes nothing
    assert report.count("unchanged") == 2
    assert len(vector_files()) == 1

    (docs / "third.txt").write_text("Harbour pilots board ships from small fast launches.")
    killed_before_cleanup()
    assert len(vector_files()) == 2
    index = TenantIndex.open(data_dir, "gen", embedder_name=embedder.name, dimension=embedder.dimension)
    try:
        assert vector_files() == [index_module.vectors_path(index_dir, index.generation).name]
        assert len(index) > 0
    finally:
        index.close()
