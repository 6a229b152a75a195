"""Page furniture (running headers and footers, page numbers, contents lines) is kept out of chunks, never out of
the page text; lines that only look like furniture stay."""

import pytest

from core.settings import ChunkingSettings
from ingest.chunking import Chunker
from ingest.furniture import find_furniture
from ingest.loaders import load_document
from ingest.settings import IngestSettings
from tests.conftest import SAMPLE_DOCS
from tests.ingest.pdf_pages import write_pdf

HEADER = "Kestrel Instruments - KT-300 Field Manual 2026"
CONTENTS = [
    "Contents",
    "Deployment .................... 2",
    "Calibration . . . . . . . . . . 3",
    "Maintenance ..................... 4",
]
BODY = {
    2: [
        "Section 4",
        "Deployment",
        "Anchor the buoy with a 12 mm chain in water at least 3 metres deep.",
        "Chain length at 5 m depth, in metres:",
        "14",
    ],
    3: [
        "Section 7",
        "Calibration",
        "Calibrate the pH probe every 90 days with the pH 4 and pH 7 standards.",
        "The dissolved oxygen cap needs no calibration in its first year.",
        "Disconnect the battery before opening the hull.",
    ],
    4: [
        "Section 9",
        "Maintenance",
        "Wipe the optical window monthly; biofouling raises turbidity readings by up to 20 NTU.",
        "Replace the desiccant pack when its indicator turns pink.",
        "Disconnect the battery before opening the hull.",
    ],
}


def manual_pages() -> list[list[str]]:
    """Lines of a 5-page manual: a running header, "Page n of 5" footers, a contents page and a blank last page."""
    pages = [[HEADER, *CONTENTS, "Page 1 of 5"]]
    for number in (2, 3, 4):
        pages.append([HEADER, *BODY[number], f"Page {number} of 5"])
    pages.append([HEADER, "This page is intentionally left blank.", "Page 5 of 5"])
    return pages


def removed_lines(texts: list[str]) -> list[list[str]]:
    return [[text[start:end] for start, end in spans] for text, spans in zip(texts, find_furniture(texts))]


def test_running_headers_page_footers_and_contents_lines_are_found():
    texts = ["\n".join(lines) for lines in manual_pages()]
    removed = removed_lines(texts)
    assert removed[0] == [HEADER, *CONTENTS[1:], "Page 1 of 5"]
    for number in (2, 3, 4, 5):
        assert removed[number - 1] == [HEADER, f"Page {number} of 5"], number
    # Lines that merely look like furniture stay: "Section 4/7/9" at the top of three pages (digits that do not
    # follow the page), a table figure at the bottom of a page ("14"), a warning at the bottom of only two pages.


def test_headers_vary_in_page_numbers_and_bare_page_numbers_are_found():
    growth = [3, 9, 4, 12, 7, 5]
    texts = [
        f"ANNUAL REPORT 2025 | {number + 10}\nRevenue grew by {growth[number - 1]} percent.\n{number + 10}"
        for number in range(1, 7)
    ]
    removed = removed_lines(texts)
    for number, lines in enumerate(removed, start=1):
        assert lines == [f"ANNUAL REPORT 2025 | {number + 10}", str(number + 10)]
    # "Revenue grew by # percent." recurs at the edge of every page too, but its digits do not follow the page.


def test_contents_without_dot_leaders_need_a_run_of_ascending_page_numbers():
    contents = ["Table of Contents", "Item 1. Business 5", "Item 1A. Risk Factors 14", "Item 2. Properties 25",
                "PART II", "Item 5. Market for Common Equity 26", "Item 7. Discussion and Analysis 29",
                "Item 8. Financial Statements 48", "Signatures 116"]
    counts = ["Employees by site", "Aberdeen 12", "Bergen 15", "Cork 21", "Dundee 40", "Total 88"]
    rows = ["(Dollars in millions) Q1 Q2 Total", "Amortization 10 11 21", "Litigation related 6 9 15",
            "Impairments 9 9 18", "Restructuring related 13 14 27", "Integration 12 18 30", "(Gains)/losses 7 (1) 36"]
    removed = removed_lines(["\n".join(contents), "\n".join(counts), "\n".join(rows)] + [""] * 117)
    assert removed[0] == contents[1:]
    assert removed[1] == []  # five labelled counts are a table, not a table of contents
    assert removed[2] == []  # rows of figures are a table even when the last column goes up


def test_a_document_without_furniture_keeps_every_line():
    document = load_document(SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf", settings=IngestSettings())
    assert [page.furniture for page in document.pages] == [()] * 4


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    path = write_pdf(tmp_path_factory.mktemp("furniture") / "kt300-manual.pdf", manual_pages())
    return load_document(path, settings=IngestSettings())


def test_pdf_furniture_stays_in_the_page_text_but_out_of_every_chunk(embedder, manual):
    chunker = Chunker(embedder.tokenizer, ChunkingSettings(chunk_tokens=48, overlap_tokens=8, window_tokens=16))
    chunks = list(chunker.split_pages(manual.pages, tenant="t", document_id="d", source="s"))
    pages = {page.number: page for page in manual.pages}
    assert all(HEADER in page.text and f"Page {page.number} of 5" in page.text for page in manual.pages)
    for chunk in chunks:
        page = pages[chunk.page]
        assert page.text[chunk.start : chunk.end] == chunk.text  # offsets still point into the page as extracted
        for start, end in page.furniture:
            assert end <= chunk.start or start >= chunk.end, (chunk.text, page.text[start:end])
        assert all(chunk.start <= start < end <= chunk.end for start, end in chunk.windows)
        assert "Field Manual" not in chunk.text and " of 5" not in chunk.text and "...." not in chunk.text
    # Every content line is still in a chunk of its own page.
    for number, lines in BODY.items():
        chunked = " ".join(chunk.text for chunk in chunks if chunk.page == number)
        for line in lines:
            assert line in chunked, (number, line)
    assert not any(chunk.page == 1 and "Deployment" in chunk.text for chunk in chunks)  # the contents page


def test_megabyte_long_lines_are_judged_in_linear_time():
    import time

    started = time.perf_counter()
    lines = ["Item " + "x" * 1_000_000 + " 12", "a" + "." * 1_000_000 + " 3", "word " * 200_000 + "14"]
    removed = removed_lines(["\n".join(lines), "\n".join(reversed(lines))])
    assert time.perf_counter() - started < 10  # a backtracking pattern takes minutes on one 2,000-character line
    assert removed == [[], []]  # too long for contents lines, and no edge line recurs on 3 pages
