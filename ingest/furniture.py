"""Page furniture of a PDF: running headers and footers, page numbers and table-of-contents lines.

Found per document, because a running header is only recognisable as a line that recurs on many pages.
The result is character spans of each page's text; the chunker leaves them out. The page text itself is never
changed, so a chunk's offsets keep pointing into the page as extracted (``page_text[start:end] == chunk.text``).
"""

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

# Running headers, footers and page numbers sit in the first or last few lines a page's text layer yields.
EDGE_LINES = 3
# A line at the edge of at least MIN_REPEATS pages, and of REPEAT_SHARE of them or of REPEAT_PAGES, is a running
# header or footer. Chosen on the FinanceBench filings (benchmarks/RESULTS.md, "Page furniture"): captions that
# recur on a series of table pages ("Reconciliation of Non-GAAP Financial Measures", 8 of 27 pages) stay, while
# "Table of Contents" back-links (27-83% of the pages) and a section's running header (37% of a 503-page
# filing) go.
MIN_REPEATS = 3
REPEAT_SHARE = 1 / 3
REPEAT_PAGES = 20
# A table of contents: at least this many consecutive entries ("Risk Factors 14") with page numbers that never
# go down. Fewer could be a small table of labelled counts.
MIN_TOC_ENTRIES = 6
# Contents lines are short (the longest 10-K item title is ~120 characters); longer lines are never tested, which
# also keeps the dot-leader pattern linear on a hostile page's megabyte-long line.
CONTENTS_LINE_CHARS = 250

_DIGITS = re.compile(r"\d+")
_ROMAN = re.compile(r"^[ivx]{1,6}$", re.IGNORECASE)  # front matter; "(c)" and "(d)" are footnote marks
# "3", "- 3 -", "iv", "A-3": a page number alone on its line ("(3)" is a footnote mark or a negative amount).
_BARE_NUMBER = re.compile(r"^[-–—]?\s*(\d{1,4}|[ivx]{1,6}|[A-Z]-\d{1,3})\s*[-–—]?$", re.IGNORECASE)
# "Page 3", "Page 3 of 8", "page 3/8", "3 of 8": never content, wherever they stand.
_PAGE_OF = re.compile(r"^(?:page|pg\.?|p\.)\s*\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?$|^\d{1,4}\s+of\s+\d{1,4}$", re.IGNORECASE)
# "Risk Factors ........ 14": dot leaders (or an ellipsis character) before a page number.
_DOT_LEADER = re.compile(r"[A-Za-z].*?(?:\.\s?){4,}\s*(?:\d{1,4}|[ivx]{1,6}|[A-Z]-\d{1,3})$|[A-Za-z].*?…+\s*\d{1,4}$")
_LETTER = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[A-Za-z]{2}")


@dataclass(frozen=True)
class _Line:
    start: int  # offsets of the stripped line in its page's text
    end: int
    text: str  # stripped, inner whitespace collapsed


def find_furniture(pages: Sequence[str]) -> list[tuple[tuple[int, int], ...]]:
    """For each page text of one document, the ``(start, end)`` spans of its furniture lines, in order.

    Furniture: lines repeated at the top or bottom of many pages once digits are ignored ("Table of Contents",
    "Annual Report 2023 | 14"), page numbers at a page's edge ("14", "- 14 -", "Page 14 of 80"), and
    table-of-contents lines (dot leaders, or a run of titles with ascending page numbers).
    """
    lines = [_lines_of(text) for text in pages]
    found: list[set[int]] = [set() for _ in pages]  # indices into lines[page] judged furniture
    _mark_repeated_edges(lines, found)
    _mark_page_numbers(lines, found)
    for page_lines, marked in zip(lines, found):
        _mark_contents(page_lines, marked, page_count=len(pages))
    return [
        tuple((page_lines[i].start, page_lines[i].end) for i in sorted(marked))
        for page_lines, marked in zip(lines, found)
    ]


def _lines_of(text: str) -> list[_Line]:
    lines, offset = [], 0
    for raw in text.split("\n"):
        stripped = raw.strip()
        if stripped:
            start = offset + len(raw) - len(raw.lstrip())
            lines.append(_Line(start, start + len(stripped), " ".join(stripped.split())))
        offset += len(raw) + 1
    return lines


def _edges(page_lines: list[_Line]) -> list[int]:
    count = len(page_lines)
    return sorted(set(range(min(EDGE_LINES, count))) | set(range(max(count - EDGE_LINES, 0), count)))


def _mark_repeated_edges(lines: list[list[_Line]], found: list[set[int]]) -> None:
    """Edge lines whose digit-free form recurs at the edge of many pages, with digits that are either the same
    everywhere ("Form 10-K 2023") or follow the page number ("Annual Report | 14")."""
    occurrences: dict[str, list[tuple[int, int]]] = defaultdict(list)  # key -> (page index, line index)
    for page, page_lines in enumerate(lines):
        seen = set()
        for index in _edges(page_lines):
            key = _DIGITS.sub("#", page_lines[index].text.lower())
            if key not in seen and re.search(r"[a-z]{2}", key):  # not "(a)": footnote marks are not headers
                seen.add(key)
                occurrences[key].append((page, index))
    needed = max(MIN_REPEATS, min(REPEAT_SHARE * len(lines), REPEAT_PAGES))
    for key, places in occurrences.items():
        if len(places) < needed:
            continue
        numbers = [tuple(map(int, _DIGITS.findall(lines[page][index].text))) for page, index in places]
        if "#" in key and not _constant_or_page_numbers(numbers, [page for page, _ in places]):
            continue  # "Note 3", table rows: digits that change but are not page numbers
        for page, index in places:
            found[page].add(index)


def _constant_or_page_numbers(numbers: list[tuple[int, ...]], pages: list[int]) -> bool:
    if len(set(numbers)) == 1:
        return True
    # Some number position goes up with the page: page - number is the same for most of the occurrences.
    for position in range(min(len(n) for n in numbers)):
        offsets = Counter(page - n[position] for page, n in zip(pages, numbers))
        if offsets.most_common(1)[0][1] >= 0.8 * len(numbers):
            return True
    return False


def _mark_page_numbers(lines: list[list[_Line]], found: list[set[int]]) -> None:
    """"Page 3 of 8" anywhere; a bare number at a page's edge when it is the page number give or take an offset
    that another page shares (front matter and exhibits shift the printed numbers; a lone table figure at the
    bottom of a page rarely lines up with another page's)."""
    candidates: list[tuple[int, int, int]] = []  # (page index, line index, page index - printed number)
    for page, page_lines in enumerate(lines):
        for index, line in enumerate(page_lines):
            if _PAGE_OF.match(line.text):
                found[page].add(index)
        for index in _edges(page_lines):
            match = _BARE_NUMBER.match(page_lines[index].text)
            if match:
                value = _number_value(match.group(1))
                if value is not None:
                    candidates.append((page, index, page + 1 - value))
    shared = Counter(offset for _, offset in {(page, offset) for page, _, offset in candidates})  # pages per offset
    for page, index, offset in candidates:
        if shared[offset] >= 2:
            found[page].add(index)


def _number_value(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    if "-" in token:  # "A-3": appendix pages are numbered by their own sequence
        return int(token.split("-")[1])
    if _ROMAN.match(token):
        return _roman_value(token.lower())
    return None


def _roman_value(token: str) -> int:
    values = {"i": 1, "v": 5, "x": 10}
    total = 0
    for current, following in zip(token, token[1:] + " "):
        value = values[current]
        total += -value if values.get(following, 0) > value else value  # "iv": 5 - 1
    return total


def _mark_contents(page_lines: list[_Line], found: set[int], *, page_count: int) -> None:
    """Dot-leader lines, and runs of at least MIN_TOC_ENTRIES entries whose page numbers never go down, with the
    short lines between them ("PART II", "Item 1.")."""
    for index, line in enumerate(page_lines):
        if len(line.text) <= CONTENTS_LINE_CHARS and _DOT_LEADER.match(line.text):
            found.add(index)
    entries: list[int] = []  # the current run's entry lines
    run: list[int] = []  # its entries and the short lines between them
    between: list[int] = []  # short lines since its last entry
    last = 0
    for index, line in enumerate(page_lines):
        number = _contents_page_number(line.text, page_count=page_count)
        if number is not None and (not entries or number >= last):
            entries.append(index)
            run += between + [index]
            between, last = [], number
        elif number is None and entries and len(between) < 3 and len(line.text.split()) <= 8:
            between.append(index)
        else:  # the run ends here; a descending entry starts the next one
            if len(entries) >= MIN_TOC_ENTRIES:
                found.update(run)
            entries, run = ([index], [index]) if number is not None else ([], [])
            between, last = [], number or 0
    if len(entries) >= MIN_TOC_ENTRIES:
        found.update(run)


def _contents_page_number(text: str, *, page_count: int) -> int | None:
    """The page number a contents entry points to, or None when ``text`` is no entry.

    An entry: a title then one page number ("Item 1A. Risk Factors 14", "Note 3 – Income Taxes 81"), no money or
    percentages, and a word just before the number ("Restructuring related 130 145 275" is a table row). Printed
    numbers can run ahead of the PDF's own page count (a filing's exhibits), but not by much.
    """
    if len(text) > CONTENTS_LINE_CHARS or "$" in text or "%" in text or not _WORD.search(text):
        return None
    words = text.rsplit(None, 2)
    if len(words) < 2 or not (words[-1].isascii() and words[-1].isdigit()) or len(words[-1]) > 4:
        return None
    if not _LETTER.search(words[-2]) or int(words[-1]) > page_count + 50:
        return None
    return int(words[-1])
