"""Loaders on the sample corpus and on every kind of bad input; folder discovery."""

import os
from pathlib import Path

import pytest

from ingest.discovery import discover_files
from ingest.loaders import LoadError, document_id_of, load_document, markdown_sections
from ingest.settings import IngestSettings
from tests.conftest import SAMPLE_DOCS
from tests.ingest.bad_inputs import write_bad_inputs

LIMITS = IngestSettings()


def test_pdf_has_one_page_per_pdf_page_with_its_own_facts():
    document = load_document(SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf", settings=LIMITS)
    assert document.format == "pdf"
    assert [page.number for page in document.pages] == [1, 2, 3, 4]
    facts = {1: "18.5 kg", 2: "0.1 mg/L", 3: "about 8 km", 4: "310 EUR"}
    for number, fact in facts.items():
        holding = [page.number for page in document.pages if fact in page.text]
        assert holding == [number], fact


def test_markdown_keeps_heading_paths_with_offsets_into_the_page():
    document = load_document(SAMPLE_DOCS / "handbook" / "maintenance.md", settings=LIMITS)
    (page,) = document.pages
    assert page.text == (SAMPLE_DOCS / "handbook" / "maintenance.md").read_text(encoding="utf-8")
    by_path = {section.heading_path: page.text[section.start : section.end] for section in page.sections}
    ph = by_path[("Kestrel Tide Maintenance Guide", "Calibration", "pH calibration")]
    assert ph.startswith("### pH calibration") and "every 90 days" in ph and "Conductivity" not in ph
    # Sections tile the page: no text is lost between them.
    assert page.sections[0].start == 0 and page.sections[-1].end == len(page.text)
    assert all(a.end == b.start for a, b in zip(page.sections, page.sections[1:]))


def test_markdown_headings_inside_code_fences_are_not_headings():
    text = "# Top\nintro\n```\n# not a heading\n```\n## Sub\nbody\n"
    paths = [section.heading_path for section in markdown_sections(text)]
    assert paths == [("Top",), ("Top", "Sub")]


def test_plain_text_is_one_page():
    document = load_document(SAMPLE_DOCS / "policies" / "returns-and-warranty.txt", settings=LIMITS)
    assert [page.number for page in document.pages] == [1]
    assert "three-year limited warranty" in document.pages[0].text
    assert document.warnings == []


def test_html_keeps_visible_text_only_and_heading_paths():
    document = load_document(SAMPLE_DOCS / "support" / "faq.html", settings=LIMITS)
    text = document.pages[0].text
    assert "600 per minute per API token" in text
    for boilerplate in ("KC-TRACKING-0042", "font-family", "Status page", "Sign in", "Privacy | Cookies"):
        assert boilerplate not in text
    api = [s for s in document.pages[0].sections if s.heading_path[-1:] == ("Is there an API?",)]
    assert len(api) == 1 and "600 per minute" in text[api[0].start : api[0].end]


def test_invalid_utf8_is_decoded_with_replacement_and_a_warning(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    document = load_document(path, settings=LIMITS)
    assert document.pages[0].text == "caf\ufffd au lait"
    (warning,) = document.warnings
    assert "not valid UTF-8" in warning and str(path) in warning


def test_crlf_line_endings_are_normalised(tmp_path):
    path = tmp_path / "dos.md"
    path.write_bytes(b"# Title\r\n\r\nline one\r\nline two\r\n")
    page = load_document(path, settings=LIMITS).pages[0]
    assert page.text == "# Title\n\nline one\nline two\n"


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_inputs(folder)


@pytest.mark.parametrize(
    "name", ["encrypted.pdf", "aes-password.pdf", "truncated.pdf", "empty.md", "mislabeled.pdf", "scanned.pdf", "bomb.pdf", "binary.txt"]
)
def test_bad_inputs_fail_with_a_clear_reason(bad_folder, name):
    folder, expected = bad_folder
    with pytest.raises(LoadError) as raised:
        load_document(folder / name, settings=LIMITS)
    message = str(raised.value)
    assert str(folder / name) in message
    assert expected[name].lower() in message.lower(), message


def test_size_and_character_limits_are_enforced(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 1000)
    with pytest.raises(LoadError, match="over the .* MiB limit"):
        load_document(path, settings=IngestSettings(max_file_bytes=1000))
    with pytest.raises(LoadError, match="bytes of text is over the limit of 100 characters"):
        load_document(path, settings=IngestSettings(max_document_chars=100))  # refused before reading
    with pytest.raises(LoadError, match="5000 characters of text, over the limit"):
        load_document(path, settings=IngestSettings(max_document_chars=4000))  # refused after decoding
    pdf = SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf"
    with pytest.raises(LoadError, match="page 1 has .* characters"):
        load_document(pdf, settings=IngestSettings(max_page_chars=50))


def test_text_file_holding_a_pdf_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes((SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf").read_bytes())
    with pytest.raises(LoadError, match="content is a PDF"):
        load_document(path, settings=LIMITS)


def test_document_id_hashes_the_file_and_its_path(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same"), b.write_text("same")
    first = document_id_of(a)
    assert document_id_of(a) == first  # stable: re-ingest finds the file unchanged
    assert document_id_of(b) != first  # identical bytes under another name: another document, other chunk ids
    a.write_text("changed")
    assert document_id_of(a) != first


def test_discovery_walks_folders_skips_hidden_and_unsupported_and_survives_symlink_loops(tmp_path):
    root = tmp_path / "docs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "a.md").write_text("# A\n")
    (root / "b.txt").write_text("b")
    (root / ".hidden.md").write_text("secret")
    (root / ".git").mkdir()
    (root / ".git" / "c.md").write_text("c")
    (root / "image.png").write_bytes(b"\x89PNG")
    os.symlink(root, root / "sub" / "loop")  # a cycle back to the top
    os.symlink(root / "b.txt", root / "sub" / "b-again.txt")  # the same file twice
    found = discover_files([root, root / "b.txt"])
    assert sorted(p.relative_to(root).as_posix() for p in found.files) == ["b.txt", "sub/deeper/a.md"]
    reasons = {p.name: reason for p, reason in found.skipped}
    assert reasons[".hidden.md"] == "hidden file" and reasons[".git"] == "hidden folder"
    assert "unsupported" in reasons["image.png"]
    assert discover_files([tmp_path / "missing"]).missing == [tmp_path / "missing"]


def test_odd_unicode_file_names_load(tmp_path):
    names = ["résumé — 日本語 📄.md", "cafe\u0301 (NFD).txt", "spaces and 'quotes'.html"]
    for name in names:
        (tmp_path / name).write_text("# Title\n\nSome text about unicode names.\n", encoding="utf-8")
    found = discover_files([tmp_path])
    assert sorted(p.name for p in found.files) == sorted(names)
    for path in found.files:
        assert "unicode names" in load_document(Path(path), settings=LIMITS).pages[0].text
